"""Stage `dedup`: exact SemDeDup-style graph dedup inside every cluster (DESIGN.md 2).

Three steps, on Ray workers, none gathering rows on the driver:

1. **Plan.** The clusters are packed into tasks of about `rows_per_task` rows from the cluster
   stage's sample sizes (a big cluster alone in its task, the tasks with the most similarity
   work first; `stages/scatter.py`). The plan is kept in `dedup/_plan.json`.
2. **Scatter.** Each row with its image vector, sorted by (task, cluster) into scatter files
   (Arrow IPC, uncompressed) whose record batches never straddle two tasks. The cluster stage
   writes them in the pass that assigns the rows (`cluster/.scatter/`); dedup writes its own
   (`dedup/_by_cluster/`) from embed/ and cluster/ only when those are gone or were packed
   for other settings, joining the two on `sample_id` row by row.
3. **Components.** A task reads its own record batches from each scatter file that holds any
   (memory-mapped), orders them by (cluster, sample_id), runs the exact component search
   (`cores.components`, several thresholds in one pass) and the keep rule per cluster, and
   writes one part.

Writes dedup/part-*.parquet with one row per input row: sample_id, cluster_id, component_id,
component_size, kept, max_sim, clip_score, centroid_cos, and `kept_<t>` for every extra
threshold. Both scatter folders are removed once the stage is complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from condense.cores.components import components
from condense.cores.keep import KeepRule, component_sizes, keep_mask
from condense.cores.vectors import to_unit_float32
from condense.errors import StageError
from condense.runtime.processor import Processor, Resources, WorkItem
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
from condense.stages.cluster import ClusterStage
from condense.stages.embed import EmbedStage
from condense.stages.embed.vectors import EmbedVectors
from condense.stages.scatter import (
    CLUSTER_SCATTER,
    DEDUP_SCATTER,
    SAMPLE_SIZES,
    TASK_BATCHES,
    PartGroup,
    TaskPlan,
    cluster_ids,
    scatter_file,
    scatter_groups,
    scatter_ready,
    write_scatter,
)
from condense.storage.files import atomic_write_json, read_json
from condense.storage.fs import remove_tree
from condense.storage.parts import (
    ScratchFiles,
    discard_parts,
    discard_scratch,
    finished_parts,
    part_path,
    part_rows,
    read_array,
    read_table,
    write_part,
)
from condense.strict import StrictModel

PLAN = "_plan.json"  # in dedup/: how the clusters were packed into tasks


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


@dataclass
class ClusterScatter(Processor):
    """Joins some embed parts with their cluster parts and writes them sorted by (task, cluster)
    into one scatter file, each task's rows in record batches of their own."""

    stage = "dedup"
    vectors: EmbedVectors  # where embed/'s image vectors are
    cluster_dir: str
    out_dir: str  # dedup/_by_cluster
    task_of: np.ndarray  # the task of every cluster (int32)
    workers: int | None = None  # dedup.workers

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, workers=self.workers)

    def process(self, item: PartGroup) -> dict:
        start = time.perf_counter()
        tables = [self._joined(name) for name in item.sources]
        k = len(self.task_of)
        ids = [
            cluster_ids(t.column(CLUSTER_ID), k, n)
            for t, n in zip(tables, item.sources, strict=True)
        ]
        path = scatter_file(self.out_dir, item.sources[0])
        index_bytes = write_scatter(
            pa.concat_tables(tables), np.concatenate(ids), self.task_of, path
        )
        return {
            "part": item.part,
            "files": [str(path)],
            "rows_in": sum(len(t) for t in tables),
            "index_bytes": index_bytes,
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
        schemas = self.files.schemas()
        self.first_batch = [
            np.asarray(json.loads(schema.metadata[TASK_BATCHES]), np.int64) for schema in schemas
        ]
        self.empty = schemas[0].empty_table()  # a task no row reached

    def task_rows(self, task: int) -> tuple[pa.Table, int]:
        """The task's rows from every scatter file, and how many files held some."""
        wanted = [
            (i, int(first[task]), int(first[task + 1]))
            for i, first in enumerate(self.first_batch)
            if first[task + 1] > first[task]
        ]
        if not wanted:
            return self.empty, 0
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
        # A plan packed from estimated sizes may hold clusters no row reached: skipped (a task
        # with no row at all still writes its empty part).
        present = [i for i, n in enumerate(sizes.tolist()) if n] or [0]
        with threadpool_limits(self.threads):  # BLAS threads for this task only
            for i in present:
                cluster, lo, n = item.clusters[i], int(bounds[i]), int(sizes[i])
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
            "clusters": int(np.count_nonzero(sizes)),
            "largest_cluster": int(sizes.max(initial=0)),
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
    version = 2  # 2: tasks packed from the cluster stage's sample sizes
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
        gpus = ctx.executor.gpus()
        if cfg.device == "cuda" and gpus == 0:
            raise StageError("dedup.device is cuda but the Ray cluster has no GPUs")
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)

        t0 = time.perf_counter()
        plan, groups = self._plan(ctx)
        items = [
            ClusterGroup(
                part=f"{i:0{max(5, len(str(len(plan.tasks))))}d}",
                task=i,
                clusters=clusters,
                rows=int(plan.sizes[clusters].sum()),
            )
            for i, clusters in enumerate(plan.tasks)
        ]
        scatter_paths, scatter = self._scatter(ctx, plan, groups, items)
        scatter_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        worker = DedupWorker(
            [str(p) for p in scatter_paths],
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
        discard_scratch(out_dir, DEDUP_SCATTER, prefix="scatter-")
        remove_tree(ctx.run.stage_dir(ClusterStage.name) / CLUSTER_SCATTER)
        rows_in = sum(s["rows_in"] for s in stats)
        kept = {str(t): sum(s["kept"][str(t)] for s in stats) for t in cfg.all_thresholds()}
        rows_out = kept[str(cfg.threshold)]
        scatter["max_files_per_task"] = max((s["scatter_files_read"] for s in stats), default=0)
        extra = {
            "threshold": cfg.threshold,
            "kept_at": kept,
            "clusters": sum(s["clusters"] for s in stats),
            "largest_cluster": max((s["largest_cluster"] for s in stats), default=0),
            "tasks": len(items),
            "scatter": scatter,
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

    def _plan(self, ctx: StageContext) -> tuple[TaskPlan, list[PartGroup]]:
        """The clusters packed into tasks (from the cluster stage's sample sizes), and the
        groups of parts a scatter file holds. A resumed run whose plan changed starts over."""
        cfg = ctx.config.dedup
        out_dir = ctx.run.stage_dir(self.name)
        cluster_dir = ctx.run.stage_dir(ClusterStage.name)
        rows = part_rows(cluster_dir)
        sample_sizes = read_array(cluster_dir / SAMPLE_SIZES)
        plan = TaskPlan.of(sample_sizes, sum(rows.values()), cfg.rows_per_task)
        groups = scatter_groups(rows, cfg.scatter_rows, ctx.executor.cpus())
        cut = [g.part for g in groups]
        before = read_json(out_dir / PLAN) if ctx.resumed else None
        if isinstance(before, dict) and before.pop("groups", None) != cut:
            discard_scratch(out_dir, DEDUP_SCATTER, prefix="scatter-")  # cut otherwise
        if isinstance(before, dict) and before != plan.key():
            # Kept parts were cut by another packing (rows_per_task changed).
            ctx.log("[dedup] the task plan changed since the interrupted run: starting over")
            discard_parts(out_dir)
            discard_scratch(out_dir, DEDUP_SCATTER, prefix="scatter-")
        atomic_write_json(out_dir / PLAN, {**plan.key(), "groups": cut})
        return plan, groups

    def _scatter(self, ctx: StageContext, plan: TaskPlan, groups, items) -> tuple[list, dict]:
        """The scatter files: the cluster stage's, when it wrote them for this plan and these
        groups; else written here from embed/ and cluster/ (skipped when every part is done)."""
        cfg = ctx.config.dedup
        out_dir = ctx.run.stage_dir(self.name)
        cluster_dir = ctx.run.stage_dir(ClusterStage.name)
        ready = scatter_ready(cluster_dir / CLUSTER_SCATTER, plan, groups)
        if ready is not None:
            ctx.log("[dedup] reading the scatter the cluster stage wrote with its assignment")
            return ready["paths"], {
                "files": len(groups),
                "index_bytes": ready["index_bytes"],
                "written_by": ClusterStage.name,
            }
        scatter_dir = out_dir / DEDUP_SCATTER
        index_bytes = 0
        if len(finished_parts(out_dir, [i.part for i in items])) < len(items):
            # (a run killed while removing the scatter, every part done, skips it)
            scatter = ClusterScatter(
                EmbedVectors.of(ctx.run.stage_dir(EmbedStage.name)),
                str(cluster_dir),
                str(scatter_dir),
                plan.task_of(),
                cfg.workers,
            )
            index_bytes = sum(s["index_bytes"] for s in write_parts(ctx, scatter, groups))
        paths = [scatter_file(scatter_dir, g.sources[0]) for g in groups]
        return paths, {"files": len(groups), "index_bytes": index_bytes, "written_by": self.name}
