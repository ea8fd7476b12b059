"""Stage `dedup`: exact SemDeDup-style graph dedup inside every cluster (DESIGN.md 2).

Two phases, both on Ray workers, neither gathering data on the driver:

1. **Scatter.** Each embed part is joined with its cluster part (checked row by row on
   `sample_id`), sorted by `cluster_id` and written to `dedup/_by_cluster/<part>.arrow` (Arrow
   IPC, uncompressed, memory-mappable) with the row offset of every cluster. One file per part,
   whatever k is.
2. **Components.** Clusters are packed into tasks of about `rows_per_task` rows, a big cluster
   alone in its task, and the tasks with the most similarity work start first. A task
   memory-maps its clusters' slices from every scatter file, runs the exact component search
   (`cores.components`, several thresholds in one pass) and the keep rule, and writes one part.

Writes dedup/part-*.parquet with one row per input row: sample_id, cluster_id, component_id,
component_size, kept, max_sim, clip_score, centroid_cos, and `kept_<t>` for every extra
threshold. The scatter folder is removed once the stage is complete.
"""

from __future__ import annotations

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
from condense.stages.base import SourcePart, Stage, StageContext, StageResult, write_parts
from condense.stages.cluster import CENTROIDS, ClusterStage
from condense.stages.embed import EmbedStage
from condense.storage.files import atomic_write_npy
from condense.storage.parts import (
    discard_scratch,
    part_path,
    part_rows,
    read_array,
    read_scratch,
    read_table,
    write_part,
    write_scratch,
)
from condense.strict import StrictModel

SCATTER_DIR = "_by_cluster"
SCATTER_SLICE = 65_536  # rows per record batch of a scatter file


def scatter_files(folder: Path | str, source: str) -> tuple[Path, Path]:
    """One embed part's scatter file (its rows sorted by cluster) and its cluster offsets."""
    return Path(folder) / f"{source}.arrow", Path(folder) / f"{source}.offsets.npy"


class DedupConfig(StrictModel):
    """SemDeDup-style graph dedup inside each cluster."""

    threshold: float = Field(0.86, gt=0.0, le=1.0)  # cosine similarity; edge iff sim > threshold
    thresholds: list[float] = []  # extra thresholds whose kept flags come from the same pass
    keep: KeepRule = "middle"  # which member of each connected component is kept
    seed: int = 0  # seeds the `random` keep rule
    tile: int = Field(2048, ge=1)  # rows per similarity tile (memory: tile^2 floats)
    rows_per_task: int = Field(250_000, ge=1)  # clusters are packed into tasks of ~this many rows
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the Ray cluster has them
    workers: int | None = None  # parallel tasks; None: as many as the cluster's CPUs allow
    threads_per_worker: int = Field(1, ge=1)  # BLAS threads per worker

    runtime_fields = frozenset({"tile", "rows_per_task", "device", "workers", "threads_per_worker"})

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


@dataclass
class ClusterScatter(Processor):
    """Joins one embed part with its cluster part and writes it sorted by cluster."""

    stage = "dedup"
    embed_dir: str
    cluster_dir: str
    out_dir: str  # dedup/_by_cluster
    k: int
    workers: int | None = None  # dedup.workers

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, workers=self.workers)

    def process(self, item: SourcePart) -> dict:
        start = time.perf_counter()
        name = item.source
        embed = read_table(
            part_path(self.embed_dir, name), columns=[SAMPLE_ID, CLIP_SCORE, IMG_EMB]
        )
        cluster = read_table(part_path(self.cluster_dir, name))
        if not embed.column(SAMPLE_ID).equals(cluster.column(SAMPLE_ID)):
            raise StageError(
                f"dedup: cluster/part-{name}.parquet does not hold embed/part-{name}.parquet's "
                "sample_ids in the same order; rerun the cluster stage"
            )
        cluster_id = cluster.column(CLUSTER_ID).to_numpy()
        order = np.argsort(cluster_id, kind="stable")
        table = pa.table(
            {
                SAMPLE_ID: embed.column(SAMPLE_ID),
                CLUSTER_ID: cluster.column(CLUSTER_ID),
                CENTROID_DIST: cluster.column(CENTROID_DIST),
                CENTROID_COS: cluster.column(CENTROID_COS),
                CLIP_SCORE: embed.column(CLIP_SCORE),
                IMG_EMB: embed.column(IMG_EMB),
            }
        )
        offsets = np.searchsorted(cluster_id[order], np.arange(self.k + 1)).astype(np.int64)
        path, offsets_path = scatter_files(self.out_dir, name)
        # Sorted copies are taken a slice at a time: memory stays at one part plus one slice.
        slices = (
            table.take(pa.array(order[start : start + SCATTER_SLICE]))
            for start in range(0, len(order), SCATTER_SLICE)
        )
        write_scratch(path, slices, table.schema)
        atomic_write_npy(offsets_path, offsets)
        return {
            "part": item.part,
            "files": [str(path), str(offsets_path)],
            "rows_in": len(table),
            "seconds": time.perf_counter() - start,
        }


@dataclass(frozen=True, kw_only=True)
class ClusterGroup(WorkItem):
    """Clusters deduplicated by one worker into one part."""

    clusters: list[int]
    largest: int  # rows of its largest cluster


@dataclass
class DedupWorker(Processor):
    """Finds the components of a task's clusters and writes one dedup part."""

    stage = "dedup"
    scatter_dir: str
    sources: list[str]  # the scatter files' names (embed's parts)
    out_dir: str
    thresholds: list[float]  # the pipeline's threshold first
    keep: str  # the keep rule
    seed: int  # seeds the `random` keep rule
    tile: int  # rows per similarity tile
    device: str  # cpu, cuda or auto
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
        # Memory-mapped: a task reads only its clusters' entries of each part's offsets.
        folder = Path(self.scatter_dir)
        self.offsets = [read_array(scatter_files(folder, n)[1], mmap=True) for n in self.sources]
        self.tables: dict[int, pa.Table] = {}  # scatter files opened so far (memory-mapped)

    def table(self, i: int) -> pa.Table:
        if i not in self.tables:  # only the slices a task reads are ever paged in
            self.tables[i] = read_scratch(scatter_files(self.scatter_dir, self.sources[i])[0])
        return self.tables[i]

    def rows_of(self, cluster: int) -> pa.Table:
        """A cluster's rows from every scatter file, in sample_id order."""
        pieces = [
            self.table(i).slice(int(o[cluster]), int(o[cluster + 1] - o[cluster]))
            for i, o in enumerate(self.offsets)
            if o[cluster + 1] > o[cluster]
        ]
        table = pa.concat_tables(pieces)
        return table.take(pc.sort_indices(table, sort_keys=[(SAMPLE_ID, "ascending")]))

    def process(self, item: ClusterGroup) -> dict:
        from threadpoolctl import threadpool_limits

        start = time.perf_counter()
        outputs, n_rows, work = [], 0, {"tiles_computed": 0, "tiles_total": 0, "entries": 0}
        with threadpool_limits(self.threads):  # BLAS threads for this task only
            for cluster in item.clusters:
                # No reference to the cluster's rows stays here: _dedup_cluster frees the vectors.
                outputs.append(self._dedup_cluster(cluster, self.rows_of(cluster), work))
                n_rows += len(outputs[-1])
        self.tables.clear()  # the scratch is deleted after the stage: hold no map of it
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
        result = components(vectors, self.thresholds, tile=self.tile, device=self.device)
        del vectors
        work["tiles_computed"] += result.tiles_computed
        work["tiles_total"] += result.tiles_total
        work["entries"] += result.entries_computed
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


@dataclass(frozen=True, kw_only=True)
class OffsetFiles(WorkItem):
    """Some scatter files' cluster offsets, summed by one worker."""

    paths: list[str]


@dataclass
class SizeCounter(Processor):
    """Rows per cluster over some scatter files (on a worker: the driver only adds k-vectors)."""

    stage = "dedup"

    def process(self, item: OffsetFiles) -> np.ndarray:
        return sum(np.diff(read_array(path)) for path in item.paths)


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
        EmbedStage.name: (SAMPLE_ID, CLIP_SCORE, IMG_EMB),
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
        scatter_dir.mkdir(parents=True, exist_ok=True)
        cluster_dir = ctx.run.stage_dir(ClusterStage.name)
        rows = part_rows(cluster_dir)
        sources = list(rows)
        k = int(read_array(cluster_dir / CENTROIDS, mmap=True).shape[0])
        gpus = ctx.executor.gpus()
        if cfg.device == "cuda" and gpus == 0:
            raise StageError("dedup.device is cuda but the Ray cluster has no GPUs")
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)

        t0 = time.perf_counter()
        scatter = ClusterScatter(
            str(ctx.run.stage_dir(EmbedStage.name)),
            str(cluster_dir),
            str(scatter_dir),
            k,
            cfg.workers,
        )
        write_parts(
            ctx,
            scatter,
            [SourcePart(part=f"scatter-{s}", source=s, rows=rows[s]) for s in sources],
        )
        paths = [str(scatter_files(scatter_dir, s)[1]) for s in sources]
        groups = [
            OffsetFiles(part=f"sizes-{i}", paths=paths[i : i + 64])
            for i in range(0, len(paths), 64)
        ]
        sizes = sum(gather(ctx.executor, SizeCounter(), groups))
        scatter_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        tasks = plan_tasks(np.asarray(sizes), cfg.rows_per_task)
        width = max(5, len(str(len(tasks))))
        items = [
            ClusterGroup(
                part=f"{i:0{width}d}",
                clusters=clusters,
                rows=int(sum(sizes[c] for c in clusters)),
                largest=int(max(sizes[c] for c in clusters)),
            )
            for i, clusters in enumerate(tasks)
        ]
        worker = DedupWorker(
            str(scatter_dir),
            sources,
            str(out_dir),
            cfg.all_thresholds(),
            cfg.keep,
            cfg.seed,
            cfg.tile,
            device=cfg.device if use_gpu else "cpu",
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
            "largest_cluster": int(np.max(sizes)) if len(sources) else 0,
            "tasks": len(items),
            "tiles_computed": sum(s["tiles_computed"] for s in stats),
            "tiles_total": sum(s["tiles_total"] for s in stats),
            "similarity_entries": sum(s["entries"] for s in stats),
            "scatter_seconds": round(scatter_seconds, 3),
            "components_seconds": round(time.perf_counter() - t1, 3),
            "device": "cuda" if use_gpu else "cpu",
        }
        return StageResult(rows_in, rows_out, {"duplicate": rows_in - rows_out}, extra)
