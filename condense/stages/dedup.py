"""Stage `dedup`: exact SemDeDup-style graph dedup inside every cluster (DESIGN.md 2).

Three steps, on Ray workers, none gathering rows on the driver:

1. **Plan.** Workers count the rows of every cluster from cluster/'s `cluster_id` columns; the
   driver adds those k-vectors and packs the clusters into tasks of about `rows_per_task` rows
   (a big cluster alone in its task, the tasks with the most similarity work first). The plan
   is kept in `dedup/_plan.json`.
2. **Scatter.** Consecutive embed parts of about `scatter_rows` rows in all are joined with
   their cluster parts (checked row by row on `sample_id`), sorted by (task, cluster) and
   written to one scatter file `dedup/_by_cluster/<first part>.arrow` (Arrow IPC, uncompressed)
   whose record batches never straddle two tasks; its footer lists each task's first batch.
   A file's index is tasks + 1 numbers, whatever k is.
3. **Components.** A task reads its own record batches from each scatter file that holds any
   (memory-mapped), orders them by (cluster, sample_id), runs the exact component search
   (`cores.components`, several thresholds in one pass) and the keep rule per cluster, and
   writes one part.

Writes dedup/part-*.parquet with one row per input row: sample_id, cluster_id, component_id,
component_size, kept, max_sim, clip_score, centroid_cos, and `kept_<t>` for every extra
threshold. The scatter folder is removed once the stage is complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from condense.cores.components import components
from condense.cores.keep import KeepRule, component_sizes, keep_mask
from condense.cores.vectors import to_unit_float32
from condense.errors import StageError
from condense.runtime.processor import Processor, Resources, WorkItem, gather
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    COMPONENT_ID,
    COMPONENT_SIZE,
    IMG_EMB,
    KEPT,
    MAX_SIM,
    SAMPLE_ID,
    arrow_to_vectors,
)
from condense.stages.base import Stage, StageContext, StageResult, write_parts
from condense.stages.cluster import CENTROIDS, ClusterStage
from condense.stages.embed import EmbedStage
from condense.stages.embed.vectors import EmbedVectors
from condense.storage.files import atomic_write_json, read_json
from condense.storage.fs import location
from condense.storage.parts import (
    ScratchFiles,
    array_shape,
    discard_parts,
    discard_scratch,
    finished_parts,
    part_path,
    part_rows,
    read_table,
    write_part,
    write_scratch,
)
from condense.strict import StrictModel

SCATTER_DIR = "_by_cluster"
SIZE_ROWS = 5_000_000  # cluster rows counted per task (int32 ids: 20 MB)
SCATTER_SLICE = 65_536  # rows per record batch of a scatter file, at most
PLAN = "_plan.json"  # in dedup/: how the clusters were packed into tasks
TASK_BATCHES = b"condense.task_batches"  # scatter file metadata: each task's first batch


def scatter_file(folder: Path | str, source: str) -> Path:
    """The scatter file whose first embed part is `source`."""
    return location(folder) / f"{source}.arrow"


class DedupConfig(StrictModel):
    """SemDeDup-style graph dedup inside each cluster."""

    threshold: float = Field(0.86, gt=0.0, le=1.0)  # cosine similarity; edge iff sim > threshold
    thresholds: list[float] = []  # extra thresholds whose kept flags come from the same pass
    keep: KeepRule = "middle"  # which member of each connected component is kept
    seed: int = 0  # seeds the `random` keep rule
    tile: int = Field(2048, ge=1)  # rows per similarity tile (memory: tile^2 floats)
    # The similarity screen: fp32, or tf32 / bf16 / fp16 on tensor cores (torch, on CPUs too).
    # Pairs within the screen's error bound of a threshold are recomputed exactly, so every
    # kept flag is the same at any precision; max_sim is the screen's value.
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "fp32"
    rows_per_task: int = Field(250_000, ge=1)  # clusters are packed into tasks of ~this many rows
    scatter_rows: int = Field(1_000_000, ge=1)  # embed rows per scatter file (a worker holds them)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the Ray cluster has them
    workers: int | None = None  # parallel tasks; None: as many as the cluster's CPUs allow
    threads_per_worker: int = Field(1, ge=1)  # BLAS threads per worker

    runtime_fields = frozenset(
        {"tile", "rows_per_task", "scatter_rows", "device", "workers", "threads_per_worker"}
    )

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: list[float]) -> list[float]:
        for t in value:
            if not 0.0 < t <= 1.0:
                raise ValueError(f"threshold {t} is outside (0, 1]")
        return value

    def all_thresholds(self) -> list[float]:
        """The pipeline's threshold first, then the extra ones (each once)."""
        out = [self.threshold]
        for t in self.thresholds:
            if t not in out:
                out.append(t)
        return out


def kept_column(threshold: float) -> str:
    """Column holding the kept flag at an extra threshold: 0.8 -> kept_0_8, 0.86 -> kept_0_86."""
    return "kept_" + f"{threshold:g}".replace(".", "_")


def plan_tasks(sizes: np.ndarray, rows_per_task: int) -> list[list[int]]:
    """Pack cluster ids into tasks, the most similarity work (sum of size^2) first.

    Clusters are taken largest first (ties by id); one of rows_per_task rows or more gets a task
    of its own, smaller ones fill a task until it holds rows_per_task rows. Deterministic in the
    sizes, so a resumed run plans the same tasks.
    """
    ids = np.flatnonzero(sizes)
    ids = ids[np.lexsort((ids, -sizes[ids]))]
    tasks: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for c in ids.tolist():
        current.append(c)
        rows += int(sizes[c])
        if rows >= rows_per_task:
            tasks.append(current)
            current, rows = [], 0
    if current:
        tasks.append(current)
    work = [sum(int(sizes[c]) ** 2 for c in t) for t in tasks]
    return [tasks[i] for i in sorted(range(len(tasks)), key=lambda i: (-work[i], i))]


@dataclass(frozen=True, kw_only=True)
class PartGroup(WorkItem):
    """Consecutive parts of an upstream stage, handled by one worker."""

    sources: list[str]


def group_parts(rows: dict[str, int], group_rows: int, prefix: str) -> list[PartGroup]:
    """Consecutive parts (in order) cut into groups of about `group_rows` rows each."""
    groups: list[PartGroup] = []
    current: list[str] = []
    total = 0
    for name, n in rows.items():
        current.append(name)
        total += n
        if total >= group_rows:
            groups.append(PartGroup(part=f"{prefix}{current[0]}", sources=current, rows=total))
            current, total = [], 0
    if current:
        groups.append(PartGroup(part=f"{prefix}{current[0]}", sources=current, rows=total))
    return groups


@dataclass
class ClusterSizes(Processor):
    """Rows per cluster in some cluster parts (on a worker: the driver only adds k-vectors)."""

    stage = "dedup"
    cluster_dir: str
    k: int

    def process(self, item: PartGroup) -> np.ndarray:
        sizes = np.zeros(self.k, np.int64)
        for name in item.sources:
            ids = read_table(part_path(self.cluster_dir, name), columns=[CLUSTER_ID])
            sizes += np.bincount(
                _cluster_ids(ids.column(CLUSTER_ID), self.k, name), minlength=self.k
            )
        return sizes


def _cluster_ids(column: pa.ChunkedArray, k: int, part: str) -> np.ndarray:
    ids = column.to_numpy()
    if len(ids) and (ids.min() < 0 or ids.max() >= k):
        raise StageError(
            f"dedup: cluster/part-{part}.parquet holds cluster ids outside [0, {k}); "
            "rerun the cluster stage"
        )
    return ids


@dataclass
class ClusterScatter(Processor):
    """Joins some embed parts with their cluster parts and writes them sorted by (task, cluster)
    into one scatter file, each task's rows in record batches of their own."""

    stage = "dedup"
    vectors: EmbedVectors  # where embed/'s image vectors are
    cluster_dir: str
    out_dir: str  # dedup/_by_cluster
    task_of: np.ndarray  # the task of every cluster (int32, -1: empty cluster)
    tasks: int
    workers: int | None = None  # dedup.workers

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, workers=self.workers)

    def process(self, item: PartGroup) -> dict:
        start = time.perf_counter()
        tables = [self._joined(name) for name in item.sources]
        table = pa.concat_tables(tables)
        k = len(self.task_of)
        cluster_id = (
            np.concatenate(
                [
                    _cluster_ids(t.column(CLUSTER_ID), k, n)
                    for t, n in zip(tables, item.sources, strict=True)
                ]
            )
            if tables
            else np.zeros(0, np.int32)
        )
        task = self.task_of[cluster_id]
        order = np.lexsort((cluster_id, task))  # by task, then cluster (stable: input order)
        bounds = np.searchsorted(task[order], np.arange(self.tasks + 1))
        batches, first = [], [0]
        for t in range(self.tasks):  # record batches of one task each, SCATTER_SLICE rows at most
            for lo in range(int(bounds[t]), int(bounds[t + 1]), SCATTER_SLICE):
                batches.append((lo, min(int(bounds[t + 1]), lo + SCATTER_SLICE)))
            first.append(len(batches))
        index = json.dumps(first, separators=(",", ":")).encode()
        schema = table.schema.with_metadata({TASK_BATCHES: index})
        # Sorted copies are taken a batch at a time: memory stays at the group plus one batch.
        slices = (table.take(pa.array(order[lo:hi])) for lo, hi in batches)
        path = scatter_file(self.out_dir, item.sources[0])
        write_scratch(path, slices, schema)
        return {
            "part": item.part,
            "files": [str(path)],
            "rows_in": len(table),
            "index_bytes": len(index),
            "seconds": time.perf_counter() - start,
        }

    def _joined(self, name: str) -> pa.Table:
        embed = self.vectors.read(name, [SAMPLE_ID, CLIP_SCORE, IMG_EMB])
        cluster = read_table(part_path(self.cluster_dir, name))
        if not embed.column(SAMPLE_ID).equals(cluster.column(SAMPLE_ID)):
            raise StageError(
                f"dedup: cluster/part-{name}.parquet does not hold embed/part-{name}.parquet's "
                "sample_ids in the same order; rerun the cluster stage"
            )
        return pa.table(
            {
                SAMPLE_ID: embed.column(SAMPLE_ID),
                CLUSTER_ID: cluster.column(CLUSTER_ID),
                CENTROID_DIST: cluster.column(CENTROID_DIST),
                CENTROID_COS: cluster.column(CENTROID_COS),
                CLIP_SCORE: embed.column(CLIP_SCORE),
                IMG_EMB: embed.column(IMG_EMB),
            }
        )


@dataclass(frozen=True, kw_only=True)
class ClusterGroup(WorkItem):
    """Clusters deduplicated by one worker into one part."""

    task: int  # its index in the plan (the scatter files' task index)
    clusters: list[int]
    largest: int  # rows of its largest cluster


@dataclass
class DedupWorker(Processor):
    """Finds the components of a task's clusters and writes one dedup part."""

    stage = "dedup"
    scatter_paths: list[str]  # the scatter files
    out_dir: str
    thresholds: list[float]  # the pipeline's threshold first
    keep: str  # the keep rule
    seed: int  # seeds the `random` keep rule
    tile: int  # rows per similarity tile
    device: str  # cpu, cuda or auto
    precision: str  # the similarity screen (dedup.precision)
    threads: int  # BLAS threads
    gpu: bool = False
    workers: int | None = None  # dedup.workers

    @property
    def resources(self) -> Resources:
        # On GPUs, actors: Ray starts a fresh process for every GPU task (max_calls=1).
        gpus = 1.0 if self.gpu else 0.0
        return Resources(cpus=float(self.threads), gpus=gpus, actor=self.gpu, workers=self.workers)

    def setup(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if _torch_cuda() else "cpu"
        elif self.device == "cuda" and not _torch_cuda():
            raise StageError("dedup.device is cuda but this worker has no torch with CUDA")
        # Each file's task index (a list of tasks + 1 batch numbers in its footer), read once
        # per worker. Locally the rows are mapped per task, and only from the files holding
        # some; in a store the files stay open (no map is held) and are read concurrently.
        self.files = ScratchFiles(self.scatter_paths)
        self.first_batch = [
            np.asarray(json.loads(schema.metadata[TASK_BATCHES]), np.int64)
            for schema in self.files.schemas()
        ]

    def task_rows(self, task: int) -> tuple[pa.Table, int]:
        """The task's rows from every scatter file, and how many files held some."""
        wanted = [
            (i, int(first[task]), int(first[task + 1]))
            for i, first in enumerate(self.first_batch)
            if first[task + 1] > first[task]
        ]
        return pa.concat_tables(self.files.read(wanted)), len(wanted)

    def process(self, item: ClusterGroup) -> dict:
        from threadpoolctl import threadpool_limits

        start = time.perf_counter()
        rows, files = self.task_rows(item.task)
        # One sorted copy of the task, by (cluster, sample_id), read out of the mapped batches;
        # each cluster is then a zero-copy slice of it.
        order = pc.sort_indices(
            rows, sort_keys=[(CLUSTER_ID, "ascending"), (SAMPLE_ID, "ascending")]
        )
        rows = rows.take(order).combine_chunks()  # no map of the scratch is held past here
        bounds = np.searchsorted(rows.column(CLUSTER_ID).to_numpy(), item.clusters)
        sizes = np.searchsorted(rows.column(CLUSTER_ID).to_numpy(), item.clusters, "right") - bounds
        outputs, work = [], {"tiles_computed": 0, "tiles_total": 0, "entries": 0, "rechecked": 0}
        with threadpool_limits(self.threads):  # BLAS threads for this task only
            for cluster, lo, n in zip(item.clusters, bounds.tolist(), sizes.tolist(), strict=True):
                outputs.append(self._dedup_cluster(cluster, rows.slice(lo, n), work))
        n_rows = sum(len(t) for t in outputs)
        if n_rows != len(rows):
            raise StageError(
                f"dedup: task {item.part} read {len(rows):,} rows from the scatter files but its "
                f"clusters hold {n_rows:,}; the scatter files are stale: rerun without --resume"
            )
        del rows
        table = pa.concat_tables(outputs)
        path = write_part(table, self.out_dir, item.part)
        kept = {
            str(t): int(pc.sum(table.column(name)).as_py() or 0)
            for t, name in zip(self.thresholds, self._kept_names(), strict=True)
        }
        return {
            "part": item.part,
            "files": [str(path)],
            "rows_in": n_rows,
            "kept": kept,
            "clusters": len(item.clusters),
            "largest_cluster": item.largest,
            "scatter_files_read": files,
            "seconds": time.perf_counter() - start,
            **work,
        }

    def _kept_names(self) -> list[str]:
        return [KEPT] + [kept_column(t) for t in self.thresholds[1:]]

    def _dedup_cluster(self, cluster: int, rows: pa.Table, work: dict) -> pa.Table:
        n = len(rows)
        ids = rows.column(SAMPLE_ID)
        vectors = to_unit_float32(arrow_to_vectors(rows.column(IMG_EMB)))
        rows = rows.drop_columns([IMG_EMB])  # the float32 copy is all that is needed now
        result = components(
            vectors, self.thresholds, tile=self.tile, device=self.device, precision=self.precision
        )
        del vectors
        work["tiles_computed"] += result.tiles_computed
        work["tiles_total"] += result.tiles_total
        work["entries"] += result.entries_computed
        work["rechecked"] += result.rechecked
        ids_np = np.asarray(ids.to_pylist(), dtype=object)
        dist = rows.column(CENTROID_DIST).to_numpy()
        clip = rows.column(CLIP_SCORE).to_numpy()
        kept = [
            keep_mask(labels, ids_np, dist, clip, self.keep, self.seed) for labels in result.labels
        ]
        main = result.labels[0]
        columns = {
            SAMPLE_ID: ids,
            CLUSTER_ID: pa.array(np.full(n, cluster, dtype=np.int32)),
            COMPONENT_ID: pa.array((np.int64(cluster) << np.int64(32)) + main),
            COMPONENT_SIZE: pa.array(component_sizes(main).astype(np.int32)),
            KEPT: pa.array(kept[0]),
            MAX_SIM: pa.array(result.max_sim),
            CLIP_SCORE: rows.column(CLIP_SCORE),
            CENTROID_COS: rows.column(CENTROID_COS),
        }
        for t, mask in zip(self.thresholds[1:], kept[1:], strict=True):
            columns[kept_column(t)] = pa.array(mask)
        return pa.table(columns)


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class DedupStage(Stage):
    name = "dedup"
    version = 1
    reads = {
        EmbedStage.name: (SAMPLE_ID, CLIP_SCORE),  # and the image vectors, via EmbedVectors
        ClusterStage.name: (SAMPLE_ID, CLUSTER_ID, CENTROID_DIST, CENTROID_COS),
    }
    writes = (
        SAMPLE_ID,
        CLUSTER_ID,
        COMPONENT_ID,
        COMPONENT_SIZE,
        KEPT,
        MAX_SIM,
        CLIP_SCORE,
        CENTROID_COS,
    )

    def settings(self, config):
        return [config.dedup.fingerprint_dict()]

    def columns(self, config) -> tuple[str, ...]:
        return self.writes + tuple(kept_column(t) for t in config.dedup.all_thresholds()[1:])

    def compute(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.dedup
        out_dir = ctx.run.stage_dir(self.name)
        scatter_dir = out_dir / SCATTER_DIR
        cluster_dir = ctx.run.stage_dir(ClusterStage.name)
        rows = part_rows(cluster_dir)
        k = int(array_shape(cluster_dir / CENTROIDS)[0])
        gpus = ctx.executor.gpus()
        if cfg.device == "cuda" and gpus == 0:
            raise StageError("dedup.device is cuda but the Ray cluster has no GPUs")
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)

        t0 = time.perf_counter()
        counted = group_parts(rows, SIZE_ROWS, prefix="sizes-")
        sizes = sum(
            gather(ctx.executor, ClusterSizes(str(cluster_dir), k), counted), np.zeros(k, np.int64)
        )
        tasks = plan_tasks(sizes, cfg.rows_per_task)
        plan = {  # what the dedup parts depend on; the scatter files also on scatter_rows
            "k": k,
            "rows_per_task": cfg.rows_per_task,
            "tasks": len(tasks),
            "sizes_sha256": hashlib.sha256(sizes.tobytes()).hexdigest(),
        }
        before = read_json(out_dir / PLAN) if ctx.resumed else None
        if isinstance(before, dict) and before.pop("scatter_rows", None) != cfg.scatter_rows:
            discard_scratch(out_dir, SCATTER_DIR, prefix="scatter-")  # cut otherwise
        if ctx.resumed and before != plan:
            # Kept parts were cut by another packing (rows_per_task changed).
            ctx.log("[dedup] the task plan changed since the interrupted run: starting over")
            discard_parts(out_dir)
            discard_scratch(out_dir, SCATTER_DIR, prefix="scatter-")
        atomic_write_json(out_dir / PLAN, {**plan, "scatter_rows": cfg.scatter_rows})
        width = max(5, len(str(len(tasks))))
        items = [
            ClusterGroup(
                part=f"{i:0{width}d}",
                task=i,
                clusters=clusters,
                rows=int(sizes[clusters].sum()),
                largest=int(sizes[clusters].max()),
            )
            for i, clusters in enumerate(tasks)
        ]
        task_of = np.full(k, -1, np.int32)
        for t, clusters in enumerate(tasks):
            task_of[clusters] = t
        scatter = ClusterScatter(
            EmbedVectors.of(ctx.run.stage_dir(EmbedStage.name)),
            str(cluster_dir),
            str(scatter_dir),
            task_of,
            len(tasks),
            cfg.workers,
        )
        groups = group_parts(rows, cfg.scatter_rows, prefix="scatter-")
        index_bytes = 0
        if len(finished_parts(out_dir, [i.part for i in items])) < len(items):
            # (a run killed while removing the scatter, every part done, skips it)
            index_bytes = sum(s["index_bytes"] for s in write_parts(ctx, scatter, groups))
        scatter_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        worker = DedupWorker(
            [str(scatter_file(scatter_dir, g.sources[0])) for g in groups],
            str(out_dir),
            cfg.all_thresholds(),
            cfg.keep,
            cfg.seed,
            cfg.tile,
            device=cfg.device if use_gpu else "cpu",
            precision=cfg.precision,
            threads=1 if use_gpu else cfg.threads_per_worker,
            gpu=use_gpu,
            workers=cfg.workers,
        )
        stats = write_parts(ctx, worker, items)
        discard_scratch(out_dir, SCATTER_DIR, prefix="scatter-")
        rows_in = sum(s["rows_in"] for s in stats)
        kept = {str(t): sum(s["kept"][str(t)] for s in stats) for t in cfg.all_thresholds()}
        rows_out = kept[str(cfg.threshold)]
        extra = {
            "threshold": cfg.threshold,
            "kept_at": kept,
            "clusters": int(np.count_nonzero(sizes)),
            "largest_cluster": int(sizes.max(initial=0)),
            "tasks": len(items),
            "scatter": {
                "files": len(groups),
                "index_bytes": index_bytes,
                "max_files_per_task": max((s["scatter_files_read"] for s in stats), default=0),
            },
            "tiles_computed": sum(s["tiles_computed"] for s in stats),
            "tiles_total": sum(s["tiles_total"] for s in stats),
            "similarity_entries": sum(s["entries"] for s in stats),
            "precision": cfg.precision,
            "pairs_rechecked": sum(s.get("rechecked", 0) for s in stats),
            "scatter_seconds": round(scatter_seconds, 3),
            "components_seconds": round(time.perf_counter() - t1, 3),
            "device": "cuda" if use_gpu else "cpu",
        }
        return StageResult(rows_in, rows_out, {"duplicate": rows_in - rows_out}, extra)
