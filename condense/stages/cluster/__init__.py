"""Stage `cluster`: k-means on seeded samples of the image embeddings, then every row assigned
to its nearest centroid by Ray workers (centroids sent once per worker).

Writes cluster/part-*.parquet (sample_id, cluster_id, centroid_dist, centroid_cos), one per
embed part, and centroids.npy. Training (`cluster.trainer`) is exact Lloyd iterations on every
worker (`lloyd.py`: bit-identical centroids at any worker count), or faiss on one worker. The
driver holds only centroids: the workers draw the sample from embed/ themselves (`sample.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from threadpoolctl import threadpool_limits

from condense.cores.kmeans import MAX_TRAIN_ROWS, assign, prepare_centroids, train_kmeans
from condense.cores.vectors import to_unit_float32
from condense.errors import StageError
from condense.runtime.processor import Processor, Resources, WorkItem, run_one
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    CLUSTER_SCHEMA,
    IMG_EMB,
    SAMPLE_ID,
    arrow_to_vectors,
)
from condense.stages.base import SourcePart, Stage, StageContext, StageResult, write_parts
from condense.stages.cluster.lloyd import LloydWorker, split_parts, train_round
from condense.stages.cluster.sample import draw_sample
from condense.stages.embed import EmbedStage
from condense.stages.embed.store import EMBED_ROW_GROUP
from condense.stages.embed.vectors import EmbedVectors
from condense.stages.scatter import (
    CLUSTER_SCATTER,
    SAMPLE_SIZES,
    PartGroup,
    TaskPlan,
    record_scatter,
    scatter_file,
    scatter_groups,
    write_scatter,
)
from condense.storage.files import atomic_write_json, atomic_write_npy, read_json
from condense.storage.fs import location, remove_tree
from condense.storage.parts import (
    discard_parts,
    part_rows,
    read_ahead,
    read_array,
    write_part,
)
from condense.strict import StrictModel

CENTROIDS = "centroids.npy"  # in cluster/: the trained centroids
SCATTER_INTENT = "_intent.json"  # in cluster/.scatter/: the packing its files are written for


class ClusterConfig(StrictModel):
    """k-means over image embeddings (the recipe: k=100,000, 10 iterations, samples of ~20M)."""

    k: int = Field(100, ge=1)  # number of clusters
    niter: int = Field(10, ge=1)  # k-means iterations per round
    # training rows drawn per round (all rows when fewer); Lloyd's fixed-point sums hold 2^30
    sample_size: int = Field(1_000_000, ge=1, le=MAX_TRAIN_ROWS)
    rounds: int = Field(1, ge=1)  # fresh samples, each warm-started from the last centroids
    spherical: bool = False  # re-normalise centroids after each iteration (cosine k-means)
    seed: int = 0  # seeds the training samples (and faiss)
    # lloyd: exact Lloyd iterations on every worker, the same centroids at any worker count;
    # faiss: faiss.Kmeans on one worker (one GPU)
    trainer: Literal["lloyd", "faiss"] = "lloyd"
    train_workers: int | None = Field(None, ge=1)  # lloyd workers; None: one per GPU, or per CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the Ray cluster has them
    # Precision of a GPU's assignment products: a screen whose undecided rows are settled in
    # float64, so every precision gives the same assignment (CPUs search in fp32).
    screen: Literal["fp32", "tf32", "bf16", "fp16"] = "fp16"
    workers: int | None = None  # assignment workers at once; None: as many as the cluster holds
    threads_per_worker: int = Field(1, ge=1)  # faiss/BLAS threads per assignment actor
    train_threads: int | None = None  # faiss training threads; None: the node's CPUs

    runtime_fields = frozenset(
        {"device", "screen", "workers", "threads_per_worker", "train_threads", "train_workers"}
    )


@dataclass
class Assigner(Processor):
    """Assigns the rows of a group of embed parts to their nearest centroids and writes a
    cluster part for each; with `task_of`, also the group's scatter file for dedup, from the
    same read of the image vectors (`stages/scatter.py`)."""

    stage = "cluster"
    centroids: np.ndarray
    vectors: EmbedVectors  # where embed/'s image vectors are
    out_dir: str
    task_of: np.ndarray  # dedup's task of every cluster (int32)
    device: str  # cpu, cuda, or auto (a GPU worker uses its GPU if it can)
    threads: int  # faiss/BLAS threads
    gpu: bool = False  # a GPU per worker, on a long-lived actor (its index built once)
    workers: int | None = None  # cluster.workers
    screen: str = "fp16"  # cluster.screen (a GPU's product precision)

    @property
    def resources(self) -> Resources:
        gpus = 1.0 if self.gpu else 0.0
        return Resources(cpus=float(self.threads), gpus=gpus, actor=self.gpu, workers=self.workers)

    def setup(self) -> None:
        self.device = worker_device(self.device, self.stage)
        try:
            import faiss

            faiss.omp_set_num_threads(self.threads)
        except ImportError:
            pass
        self.prepared = prepare_centroids(self.centroids)  # once per worker, not per row group

    def process(self, item: PartGroup) -> dict:
        start = time.perf_counter()
        files, scattered = [], []
        for source in item.sources:
            part, rows = self._assign(source)
            files.append(str(write_part(part, self.out_dir, source)))
            if rows is not None:  # (a part whose every row embed dropped has none)
                scattered.append(rows)
        index_bytes, scatter = 0, None
        if scattered:
            table = pa.concat_tables(scattered)
            path = scatter_file(location(self.out_dir) / CLUSTER_SCATTER, item.sources[0])
            ids = table.column(CLUSTER_ID).to_numpy()
            index_bytes = write_scatter(table, ids, self.task_of, path)
            files.append(str(path))
            scatter = path.name
        return {
            "part": item.part,
            "files": files,
            "scatter": scatter,
            "rows_in": item.rows,
            "rows_out": item.rows,
            "index_bytes": index_bytes,
            "seconds": time.perf_counter() - start,
        }

    def _assign(self, source: str) -> tuple[pa.Table, pa.Table | None]:
        """One part's cluster columns, and its rows as the scatter holds them (None: it has
        none), in its order."""
        # Chunk by chunk (row groups of embed/, or runs of the input's rows), each the next one
        # read while this one is assigned; the results put back in the part's order.
        columns = [SAMPLE_ID, CLIP_SCORE, IMG_EMB]
        positions, results = [], []
        with threadpool_limits(self.threads):  # BLAS threads of the CPU search
            for where, group in read_ahead(self.vectors.chunks(source, columns, EMBED_ROW_GROUP)):
                vectors = to_unit_float32(arrow_to_vectors(group.column(IMG_EMB)))
                found = assign(vectors, self.prepared, device=self.device, screen=self.screen)
                results.append(
                    group.select(columns)
                    .append_column(CLUSTER_ID, pa.array(found.cluster_id, pa.int32()))
                    .append_column(CENTROID_DIST, pa.array(found.centroid_dist, pa.float32()))
                    .append_column(CENTROID_COS, pa.array(found.centroid_cos, pa.float32()))
                )
                positions.append(where)
        if not results or not sum(len(r) for r in results):
            return CLUSTER_SCHEMA.empty_table(), None
        rows = pa.concat_tables(results)
        order = np.argsort(np.concatenate(positions), kind="stable")  # identity for row groups
        if not np.array_equal(order, np.arange(len(order))):
            rows = rows.take(pa.array(order))
        return rows.select(CLUSTER_SCHEMA.names).cast(CLUSTER_SCHEMA), rows


def _cpu_count() -> int:
    """CPUs this process may use (sched_getaffinity is Linux-only)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_device(device: str, stage: str) -> str:
    """The device a worker computes on: auto takes its GPU if it can use one."""
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise StageError(
            f"{stage}.device is cuda but this worker has neither faiss-gpu nor torch with CUDA"
        )
    return device


def gpu_available() -> bool:
    """Whether this process can compute on a GPU (faiss-gpu, or torch with CUDA)."""
    try:
        import faiss

        if faiss.get_num_gpus() > 0:
            return True
    except ImportError:
        pass
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass(frozen=True, kw_only=True)
class TrainRound(WorkItem):
    """One k-means round: a fresh sample of `size` rows, warm-started from `init`."""

    size: int  # rows in the training sample
    seed: int  # seeds the sample and faiss
    init: np.ndarray | None  # the previous round's centroids


@dataclass
class KMeansTrainer(Processor):
    """One k-means round on one worker (so it can run on a GPU node). It draws its own sample
    from embed/, so the sample never travels through the driver."""

    stage = "cluster"
    parts: list[str]  # embed's parts
    vectors: EmbedVectors  # where embed/'s image vectors are
    rows: int  # rows in embed/
    k: int
    niter: int
    spherical: bool
    device: str  # cpu, cuda or auto
    threads: int | None  # faiss threads (None: the node's CPUs)
    gpu: bool = False

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=1.0 if self.gpu else 0.0, retries=0)

    def process(self, item: TrainRound) -> tuple[np.ndarray, np.ndarray, float]:
        started = time.perf_counter()
        sample = draw_sample(self.parts, self.vectors, self.rows, item.size, item.seed)
        sample_seconds = time.perf_counter() - started
        if len(sample) < self.k:
            raise StageError(
                f"cluster: the training sample has {len(sample)} rows, fewer than k={self.k}"
            )
        device = worker_device(self.device, self.stage)  # faiss-gpu, else Lloyd on the GPU
        centroids = train_kmeans(
            sample,
            self.k,
            niter=self.niter,
            seed=item.seed,
            spherical=self.spherical,
            init_centroids=item.init,
            device=device,
            threads=self.threads or _cpu_count(),
        )
        # The sample's rows per centroid, which pack dedup's tasks.
        counts = np.bincount(assign(sample, centroids).cluster_id, minlength=self.k)
        return centroids, counts, sample_seconds


class ClusterStage(Stage):
    name = "cluster"
    version = 3  # 2: training samples are windows of the id-hash ring; 3: the Lloyd trainer
    # The image vectors come through EmbedVectors: embed/'s parts, or the input in place.
    reads = {EmbedStage.name: (SAMPLE_ID,)}
    writes = tuple(CLUSTER_SCHEMA.names)

    def settings(self, config):
        return [config.cluster.fingerprint_dict()]

    def compute(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.cluster
        embed_dir = ctx.run.stage_dir(EmbedStage.name)
        embed_mark = ctx.run.stage_mark("embed") or {}
        rows = int(embed_mark.get("rows_out", 0))
        if rows == 0:
            raise StageError("cluster: embed/ holds no rows to cluster")
        if cfg.k > rows:
            raise StageError(
                f"cluster.k={cfg.k} is larger than the {rows:,} rows in embed/; lower cluster.k"
            )
        parts = part_rows(embed_dir)
        items = [SourcePart(part=part, source=part, rows=n) for part, n in parts.items()]
        out_dir = ctx.run.stage_dir(self.name)
        centroids_path, sizes_path = out_dir / CENTROIDS, out_dir / SAMPLE_SIZES
        gpus = ctx.executor.gpus()
        if cfg.device == "cuda" and gpus == 0:
            raise StageError("cluster.device is cuda but the Ray cluster has no GPUs")
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)

        t0 = time.perf_counter()
        if ctx.resumed and centroids_path.exists() and sizes_path.exists():
            centroids, sample_sizes = read_array(centroids_path), read_array(sizes_path)
            ctx.log(f"[cluster] resuming with the trained centroids in {centroids_path}")
            rounds = []
        else:
            centroids, sample_sizes, rounds = self._train(ctx, items, rows, use_gpu)
            atomic_write_npy(sizes_path, np.asarray(sample_sizes, np.int64))
            atomic_write_npy(centroids_path, centroids)
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        # Dedup's tasks are packed now, so the assignment scatters each row as it assigns it.
        dedup = ctx.config.dedup
        plan = TaskPlan.of(sample_sizes, rows, dedup.rows_per_task)
        groups = scatter_groups(parts, dedup.scatter_rows, ctx.executor.cpus())
        scatter_dir = out_dir / CLUSTER_SCATTER
        intent = {**plan.key(), "groups": [g.part for g in groups]}
        if ctx.resumed and read_json(scatter_dir / SCATTER_INTENT) != intent:
            discard_parts(out_dir)  # its scatter files were packed for other settings
            remove_tree(scatter_dir)
        atomic_write_json(scatter_dir / SCATTER_INTENT, intent)
        assigner = Assigner(
            centroids,
            EmbedVectors.of(embed_dir),
            str(out_dir),
            plan.task_of(),
            device=cfg.device if use_gpu else "cpu",
            threads=1 if use_gpu else cfg.threads_per_worker,
            gpu=use_gpu,
            workers=cfg.workers,
            screen=cfg.screen,
        )
        stats = write_parts(ctx, assigner, groups)
        files = [s["scatter"] for s in stats if s.get("scatter")]
        record_scatter(scatter_dir, plan, groups, files, sum(s["index_bytes"] for s in stats))
        rows_in = sum(s["rows_in"] for s in stats)
        extra = {
            "k": cfg.k,
            "train_rounds": rounds,
            "train_seconds": round(train_seconds, 3),
            "assign_seconds": round(time.perf_counter() - t1, 3),
            "nodes": sorted({s["node"] for s in stats if "node" in s}),
        }
        return StageResult(rows_in, rows_in, {}, extra)

    def _train(self, ctx: StageContext, items: list[SourcePart], rows: int, use_gpu: bool):
        """The rounds of training; returns the centroids, the last sample's rows per centroid
        (to pack dedup's tasks) and a record of each round."""
        cfg = ctx.config.cluster
        size = min(cfg.sample_size, rows)
        vectors = EmbedVectors.of(ctx.run.stage_dir(EmbedStage.name))
        if cfg.trainer == "faiss":
            return self._train_faiss(ctx, items, rows, size, vectors, use_gpu)
        gpus, cpus = ctx.executor.gpus(), ctx.executor.cpus()
        workers = cfg.train_workers or (gpus if use_gpu else max(1, cpus // cfg.threads_per_worker))
        worker = LloydWorker(
            vectors,
            device=cfg.device if use_gpu else "cpu",
            screen=cfg.screen,
            threads=1 if use_gpu else cfg.threads_per_worker,
            cpus=1.0 if cpus >= 2 else 0.5,
            gpu=use_gpu,
        )
        workers = min(workers, len(items))  # each worker a share of the parts
        shares = split_parts({item.source: item.rows for item in items}, workers)
        centroids, rounds = None, []
        with ctx.executor.pool(worker, workers) as pool:
            for r in range(cfg.rounds):
                t = time.perf_counter()
                label = f"round {r + 1}/{cfg.rounds}"
                ctx.log(
                    f"[cluster] {label}: k-means k={cfg.k:,} on {size:,} rows, "
                    f"{workers} worker{'s' * (workers > 1)}"
                )
                result = train_round(
                    pool,
                    shares,
                    rows=rows,
                    size=size,
                    seed=cfg.seed + r,
                    k=cfg.k,
                    niter=cfg.niter,
                    spherical=cfg.spherical,
                    init=centroids,
                    log=ctx.log,
                    label=label,
                )
                centroids, sample_sizes = result.centroids, result.counts
                rounds.append(
                    {
                        "rows": size,
                        "workers": workers,
                        "objective": [round(o, 9) for o in result.objective],
                        "sample_seconds": round(result.sample_seconds, 3),
                        "seconds": round(time.perf_counter() - t, 3),
                    }
                )
        return centroids, sample_sizes, rounds

    def _train_faiss(self, ctx, items, rows: int, size: int, vectors, use_gpu: bool):
        """faiss.Kmeans, one round after the other on one worker."""
        cfg = ctx.config.cluster
        trainer = KMeansTrainer(
            [item.source for item in items],
            vectors,
            rows,
            cfg.k,
            cfg.niter,
            cfg.spherical,
            device=cfg.device if use_gpu else "cpu",
            threads=cfg.train_threads,
            gpu=use_gpu,
        )
        centroids = None
        rounds = []
        for r in range(cfg.rounds):
            t = time.perf_counter()
            ctx.log(
                f"[cluster] round {r + 1}/{cfg.rounds}: faiss k-means k={cfg.k} on {size:,} rows"
            )
            work = TrainRound(part=f"round-{r}", size=size, seed=cfg.seed + r, init=centroids)
            centroids, sample_sizes, sample_seconds = run_one(ctx.executor, trainer, work)
            seconds = time.perf_counter() - t
            rounds.append(
                {
                    "rows": size,
                    "sample_seconds": round(sample_seconds, 3),
                    "seconds": round(seconds, 3),
                }
            )
        return centroids, sample_sizes, rounds
