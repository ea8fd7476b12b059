"""Stage `cluster`: faiss k-means on a seeded sample of image embeddings, then every row assigned
to its nearest centroid by Ray workers (centroids sent once per worker).

Writes cluster/part-*.parquet (sample_id, cluster_id, centroid_dist, centroid_cos), one per
embed part, and centroids.npy. The driver holds only the centroids: training samples go from
the sampling workers to the training task through files in cluster/_sample/.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from condense import schema as S
from condense.cores.hashing import hash_ids, smallest_hash_order
from condense.cores.kmeans import assign, train_kmeans
from condense.cores.vectors import to_unit_float32
from condense.errors import StageError
from condense.pipeline.rundir import atomic_write_bytes
from condense.stages.base import (
    Stage,
    StageContext,
    StageResult,
    iter_row_groups,
    part_files,
    run_parts,
    write_part,
)
from condense.stages.unique_ids import id_hash_file
from condense.strict import StrictModel

CENTROIDS = "centroids.npy"
RING = 1 << 64  # id hashes are points on a ring of this size
SAMPLE_DIR = "_sample"  # training samples while the stage runs; removed once centroids exist


class ClusterConfig(StrictModel):
    """k-means over image embeddings (the recipe: k=100,000, 10 iterations, samples of ~20M)."""

    k: int = Field(100, ge=1)  # number of clusters
    niter: int = Field(10, ge=1)  # k-means iterations per round
    sample_size: int = Field(1_000_000, ge=1)  # training rows drawn per round (all rows when fewer)
    rounds: int = Field(1, ge=1)  # fresh samples, each warm-started from the last centroids
    spherical: bool = False  # re-normalise centroids after each iteration (cosine k-means)
    seed: int = 0  # seeds the training samples and faiss
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the Ray cluster has them
    workers: int | None = None  # assignment actors; None: one per CPU (or per GPU)
    train_threads: int | None = None  # faiss training threads; None: the node's CPUs

    runtime_fields = frozenset({"device", "workers", "train_threads"})


class SampleDrawer:
    """Writes, for each training round, the rows of one embed part inside that round's window
    of the id-hash ring: vectors to `r<round>/<part>.npy`, keys to `r<round>/<part>.keys.parquet`.

    Embed parts are stored in id-hash order, so a window is a contiguous run of rows and only
    the row groups holding it are read. Files rather than return values: a sample can be far
    larger than a message should be, and the driver then loads one round at a time.
    """

    def __init__(self, starts: list[int], width: int, embed_dir: str, out_dir: str):
        self.starts = starts
        self.width = width
        self.embed_dir = Path(embed_dir)
        self.out_dir = Path(out_dir)

    def process(self, item: dict) -> dict:
        hashes = np.load(id_hash_file(self.embed_dir, item["part"]), mmap_mode="r")["hash"]
        windows = [_window_rows(hashes, start, self.width) for start in self.starts]
        needed = np.unique(np.concatenate(windows)) if windows else np.zeros(0, np.int64)
        table = _read_rows(item["path"], needed, [S.SAMPLE_ID, S.IMG_EMB])
        vectors = S.arrow_to_vectors(table.column(S.IMG_EMB))
        counts = []
        for r, (start, rows) in enumerate(zip(self.starts, windows, strict=True)):
            at = np.searchsorted(needed, rows)
            keys = pa.table(
                {
                    S.SAMPLE_ID: table.column(S.SAMPLE_ID).take(pa.array(at)),
                    "ring_key": pa.array(ring_offset(np.asarray(hashes[rows]), start)),
                }
            )
            folder = self.out_dir / f"r{r}"
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(vectors[at]))
            atomic_write_bytes(folder / f"{item['part']}.npy", buf.getvalue())
            buf = io.BytesIO()
            pq.write_table(keys, buf)
            atomic_write_bytes(folder / f"{item['part']}.keys.parquet", buf.getvalue())
            counts.append(len(rows))
        return {"part": item["part"], "rows_in": len(hashes), "picked": counts, "read": len(needed)}


def ring_offset(hashes: np.ndarray, start: int) -> np.ndarray:
    """(hash - start) mod 2^64: a row's position on the id-hash ring counted from `start`."""
    with np.errstate(over="ignore"):
        return np.asarray(hashes, dtype=np.uint64) - np.uint64(start)


def _window_rows(sorted_hashes: np.ndarray, start: int, width: int) -> np.ndarray:
    """Rows whose hash lies in [start, start + width) on the ring (width 2^64: every row)."""
    n = len(sorted_hashes)
    if width >= RING:
        return np.arange(n)
    lo = int(np.searchsorted(sorted_hashes, np.uint64(start), side="left"))
    end = start + width
    if end <= RING - 1:
        hi = int(np.searchsorted(sorted_hashes, np.uint64(end), side="left"))
        return np.arange(lo, hi)
    hi = int(np.searchsorted(sorted_hashes, np.uint64(end - RING), side="left"))
    return np.concatenate([np.arange(lo, n), np.arange(0, hi)])


def _read_rows(path: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """The given rows (sorted) of a Parquet file, reading only the row groups that hold them."""
    f = pq.ParquetFile(path)
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    if not len(groups):
        return f.schema_arrow.empty_table().select(columns)
    table = f.read_row_groups(groups.tolist(), columns=columns, use_threads=False)
    read_starts = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
    group_of = np.searchsorted(groups, np.searchsorted(starts, rows, side="right") - 1)
    positions = read_starts[group_of] + (rows - starts[groups[group_of]])
    return table.take(pa.array(positions))


class Assigner:
    """Assigns the rows of one embed part to their nearest centroids and writes a cluster part."""

    def __init__(self, centroids: np.ndarray, out_dir: str, device: str):
        self.centroids = centroids
        self.out_dir = out_dir
        self.device = device

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        # Row group by row group, the next one read while this one is assigned; zero-copy views.
        ids, results = [], []
        for group in iter_row_groups(item["path"], [S.SAMPLE_ID, S.IMG_EMB]):
            vectors = to_unit_float32(S.arrow_to_vectors(group.column(S.IMG_EMB)))
            results.append(assign(vectors, self.centroids, device=self.device))
            ids.append(group.column(S.SAMPLE_ID))
        n = sum(len(r.cluster_id) for r in results)
        out = pa.Table.from_arrays(
            [
                pa.chunked_array([c for chunk in ids for c in chunk.chunks], type=pa.string()),
                pa.array(_concat(r.cluster_id for r in results), type=pa.int32()),
                pa.array(_concat(r.centroid_dist for r in results), type=pa.float32()),
                pa.array(_concat(r.centroid_cos for r in results), type=pa.float32()),
            ],
            schema=S.CLUSTER_SCHEMA,
        )
        write_part(out, self.out_dir, item["part"])
        return {
            "part": item["part"],
            "rows_in": n,
            "rows_out": n,
            "seconds": time.perf_counter() - start,
        }


def _concat(arrays) -> np.ndarray:
    arrays = list(arrays)
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _train_task(
    sample_dir: str,
    round_index: int,
    size: int,
    k: int,
    niter: int,
    seed: int,
    spherical: bool,
    init: np.ndarray | None,
    device: str,
    threads: int | None,
) -> np.ndarray:
    """One k-means round as a Ray task (so it can run on a GPU node). It loads its sample from
    the files the sampling pass wrote, so the sample never travels through the driver."""
    sample = load_sample(Path(sample_dir), round_index, size)
    if len(sample) < k:
        raise StageError(f"cluster: the training sample has {len(sample)} rows, fewer than k={k}")
    if device == "auto":
        import faiss

        device = "cuda" if faiss.get_num_gpus() > 0 else "cpu"
    threads = threads or len(os.sched_getaffinity(0))
    return train_kmeans(
        sample,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        init_centroids=init,
        device=device,
        threads=threads,
    )


class ClusterStage(Stage):
    name = "cluster"
    version = 2  # 2: training samples are windows of the id-hash ring
    reads = {"embed": (S.SAMPLE_ID, S.IMG_EMB)}
    writes = tuple(S.CLUSTER_SCHEMA.names)

    def settings(self, config):
        return [config.cluster.fingerprint_dict()]

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.cluster
        embed_dir = ctx.run.stage_dir("embed")
        embed_mark = ctx.run.stage_mark("embed") or {}
        rows = int(embed_mark.get("rows_out", 0))
        if rows == 0:
            raise StageError("cluster: embed/ holds no rows to cluster")
        if cfg.k > rows:
            raise StageError(
                f"cluster.k={cfg.k} is larger than the {rows:,} rows in embed/; lower cluster.k"
            )
        items = [
            {"part": p.stem.removeprefix("part-"), "path": str(p), "rows": n}
            for p, n in _part_rows(embed_dir)
        ]
        out_dir = ctx.run.stage_dir(self.name)
        centroids_path = out_dir / CENTROIDS
        gpus = ctx.executor.gpus()
        if cfg.device == "cuda" and gpus == 0:
            raise StageError("cluster.device is cuda but the Ray cluster has no GPUs")
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)

        t0 = time.perf_counter()
        if ctx.resumed and centroids_path.exists():
            centroids = np.load(centroids_path)
            ctx.log(f"[cluster] resuming with the trained centroids in {centroids_path}")
            rounds, sample_seconds = [], 0.0
        else:
            centroids, rounds, sample_seconds = self._train(ctx, items, rows, use_gpu)
            _save_npy(centroids_path, centroids)
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        stats = run_parts(
            ctx,
            self.name,
            items,
            Assigner,
            shared={
                "centroids": centroids,
                "out_dir": str(out_dir),
                "device": "cuda" if use_gpu else "cpu",
            },
            num_cpus=1.0,
            num_gpus=1.0 if use_gpu else 0.0,
            pool_size=cfg.workers,
        )
        rows_in = sum(s["rows_in"] for s in stats)
        extra = {
            "k": cfg.k,
            "sample_seconds": round(sample_seconds, 3),
            "train_rounds": rounds,
            "train_seconds": round(train_seconds, 3),
            "assign_seconds": round(time.perf_counter() - t1, 3),
            "nodes": sorted({s["node"] for s in stats if "node" in s}),
        }
        return StageResult(rows_in, rows_in, {}, extra)

    def _train(self, ctx: StageContext, items: list[dict], rows: int, use_gpu: bool):
        cfg = ctx.config.cluster
        size = min(cfg.sample_size, rows)
        seeds = [cfg.seed + r for r in range(cfg.rounds)]
        folder = ctx.run.stage_dir(self.name) / SAMPLE_DIR
        t = time.perf_counter()
        draw_samples(ctx, items, rows, size, seeds, ctx.run.stage_dir("embed"), folder)
        sampled = time.perf_counter() - t
        centroids = None
        rounds = []
        for r, seed in enumerate(seeds):
            t = time.perf_counter()
            ctx.log(f"[cluster] round {r + 1}/{cfg.rounds}: k-means k={cfg.k} on {size:,} rows")
            centroids = ctx.executor.call(
                _train_task,
                str(folder),
                r,
                size,
                cfg.k,
                cfg.niter,
                seed,
                cfg.spherical,
                centroids,
                "cuda" if use_gpu else ("cpu" if cfg.device == "cpu" else "auto"),
                cfg.train_threads,
                num_cpus=1.0,
                num_gpus=1.0 if use_gpu else 0.0,
            )
            rounds.append({"rows": size, "seconds": round(time.perf_counter() - t, 3)})
        shutil.rmtree(folder, ignore_errors=True)  # the centroids are what was worth keeping
        return centroids, rounds, sampled


def window_start(seed: int) -> int:
    """Where a seed's sample starts on the id-hash ring."""
    return int(hash_ids([f"condense-sample-{seed}"], seed)[0])


def draw_samples(
    ctx: StageContext,
    items: list[dict],
    rows: int,
    size: int,
    seeds: list[int],
    embed_dir: Path,
    folder: Path,
) -> None:
    """One pass over embed/ writing, per seed, a superset of that seed's `size`-row sample.

    A seed's sample is the `size` rows that follow window_start(seed) on the ring of id hashes
    (ties by sample_id): a uniform random sample, the same however the rows are split into
    parts. Workers keep a window a few standard deviations wider than needed; `load_sample`
    trims it to `size`.
    """
    fraction = 1.0 if size >= rows else min(1.0, (size + 6 * math.sqrt(size) + 64) / rows)
    starts = [window_start(seed) for seed in seeds]
    while True:
        width = RING if fraction >= 1.0 else int(fraction * float(RING))
        shutil.rmtree(folder, ignore_errors=True)
        shared = {
            "starts": starts,
            "width": width,
            "embed_dir": str(embed_dir),
            "out_dir": str(folder),
        }
        got = [stats for stats, _ in ctx.executor.map_items(items, SampleDrawer, shared=shared)]
        picked = np.sum([g["picked"] for g in got], axis=0)
        if picked.min() >= size or fraction >= 1.0:
            return
        fraction = min(1.0, fraction * 2)  # a rare shortfall: widen the window and draw again


def load_sample(folder: Path, round_index: int, size: int) -> np.ndarray:
    """One round's sample: the `size` rows nearest its window start, as unit float32 vectors."""
    round_dir = Path(folder) / f"r{round_index}"
    key_files = sorted(round_dir.glob("*.keys.parquet"))
    keys, ids, owner, row = [], [], [], []
    for index, path in enumerate(key_files):
        table = pq.read_table(path)
        keys.append(table.column("ring_key").to_numpy())
        ids.append(np.asarray(table.column(S.SAMPLE_ID).to_pylist(), dtype=object))
        owner.append(np.full(table.num_rows, index, dtype=np.int64))
        row.append(np.arange(table.num_rows))
    order = smallest_hash_order(np.concatenate(keys), np.concatenate(ids))[:size]
    owner_sel, row_sel = np.concatenate(owner)[order], np.concatenate(row)[order]
    out = None
    for index, path in enumerate(key_files):
        mine = np.flatnonzero(owner_sel == index)
        if not len(mine):
            continue
        vectors = np.load(str(path).removesuffix(".keys.parquet") + ".npy", mmap_mode="r")
        if out is None:
            out = np.empty((len(order), vectors.shape[1]), dtype=np.float32)
        out[mine] = to_unit_float32(np.asarray(vectors[row_sel[mine]]))
    return out if out is not None else np.zeros((0, 0), np.float32)


def _part_rows(embed_dir: Path) -> list[tuple[Path, int]]:
    """Embed part files with their row counts (read from the Parquet footers)."""
    return [(path, pq.ParquetFile(path).metadata.num_rows) for path in part_files(embed_dir)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())
