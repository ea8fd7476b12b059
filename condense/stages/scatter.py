"""The dedup scatter: every row with its image vector, sorted by (task, cluster) into
uncompressed Arrow files, so that each dedup task reads only its own record batches.

The clusters are packed into tasks before any row is scattered, from the cluster stage's
sample sizes (`cluster/sample_sizes.npy`: the last training sample's rows per centroid, scaled
to the whole input). The packing only balances the work: every cluster lies in exactly one
task whatever the estimate says, and each cluster's components are computed exactly.

The cluster stage writes the scatter in the same pass as its assignment (`cluster/.scatter/`:
each image vector is read once to be assigned and scattered); dedup reads it, and writes its
own from embed/ and cluster/ only when that one is gone (a rerun of dedup alone) or was packed
for other settings. One scatter file holds a group of consecutive embed parts of about
`dedup.scatter_rows` rows; its footer lists each task's first record batch (tasks + 1 numbers
per file, whatever k is).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from condense.errors import StageError
from condense.runtime.processor import WorkItem
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    IMG_EMB,
    SAMPLE_ID,
)
from condense.storage.files import atomic_write_json, files_intact, read_json
from condense.storage.fs import file_size, location
from condense.storage.parts import write_scratch

SAMPLE_SIZES = "sample_sizes.npy"  # in cluster/: the last training sample's rows per centroid
CLUSTER_SCATTER = ".scatter"  # in cluster/: the scatter written with the assignment
DEDUP_SCATTER = "_by_cluster"  # in dedup/: the scatter dedup writes when it must
SCATTER_PLAN = "_plan.json"  # in a scatter folder, written when every file is there
SCATTER_SLICE = 65_536  # rows per record batch of a scatter file, at most
TASK_BATCHES = b"condense.task_batches"  # scatter file metadata: each task's first batch
COLUMNS = (SAMPLE_ID, CLUSTER_ID, CENTROID_DIST, CENTROID_COS, CLIP_SCORE, IMG_EMB)


def scatter_file(folder: Path | str, source: str) -> Path:
    """The scatter file whose first embed part is `source`."""
    return location(folder) / f"{source}.arrow"


def estimated_sizes(sample_sizes: np.ndarray, rows: int) -> np.ndarray:
    """Each cluster's expected rows: its sample rows scaled to `rows`, at least one (so every
    cluster, even one the sample missed, is packed into a task)."""
    sample = max(1, int(sample_sizes.sum()))
    return np.maximum(np.ceil(sample_sizes * (rows / sample)).astype(np.int64), 1)


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


@dataclass(frozen=True)
class TaskPlan:
    """Which clusters each dedup task holds, and the rows it is expected to hold."""

    sizes: np.ndarray  # expected rows per cluster
    rows_per_task: int
    tasks: list[list[int]]

    @classmethod
    def of(cls, sample_sizes: np.ndarray, rows: int, rows_per_task: int) -> TaskPlan:
        sizes = estimated_sizes(np.asarray(sample_sizes, np.int64), rows)
        return cls(sizes, rows_per_task, plan_tasks(sizes, rows_per_task))

    def task_of(self) -> np.ndarray:
        """The task of every cluster (int32)."""
        out = np.full(len(self.sizes), -1, np.int32)
        for t, clusters in enumerate(self.tasks):
            out[clusters] = t
        return out

    def key(self) -> dict:
        """What scatter files packed by this plan depend on."""
        text = json.dumps(self.tasks, separators=(",", ":")).encode()
        return {
            "k": len(self.sizes),
            "rows_per_task": self.rows_per_task,
            "tasks": len(self.tasks),
            "sha256": hashlib.sha256(text).hexdigest(),
        }


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


def scatter_groups(rows: dict[str, int], scatter_rows: int, workers: int) -> list[PartGroup]:
    """The groups of parts whose rows one scatter file holds: about `scatter_rows` rows, but
    small enough that each of `workers` gets at least two (the cluster stage assigns and
    scatters a group per item, so groups are also its unit of work)."""
    total = sum(rows.values())
    group_rows = max(1, min(scatter_rows, -(-total // (2 * max(1, workers)))))
    return group_parts(rows, group_rows, prefix="scatter-")


def cluster_ids(column: pa.ChunkedArray | pa.Array, k: int, part: str) -> np.ndarray:
    """A part's cluster ids, checked to lie in [0, k)."""
    ids = column.to_numpy()
    if len(ids) and (ids.min() < 0 or ids.max() >= k):
        raise StageError(
            f"dedup: cluster/part-{part}.parquet holds cluster ids outside [0, {k}); "
            "rerun the cluster stage"
        )
    return ids


def write_scatter(table: pa.Table, cluster_id: np.ndarray, task_of: np.ndarray, path) -> int:
    """Write `table` (COLUMNS) sorted by (task, cluster) into one scatter file, each task's rows
    in record batches of their own; returns the bytes of its task index."""
    tasks = int(task_of.max(initial=-1)) + 1
    task = task_of[cluster_id]
    if len(task) and task.min() < 0:
        raise StageError("dedup: a cluster is in no task of the plan; rerun the cluster stage")
    order = np.lexsort((cluster_id, task))  # by task, then cluster (stable: input order)
    bounds = np.searchsorted(task[order], np.arange(tasks + 1))
    batches, first = [], [0]
    for t in range(tasks):  # record batches of one task each, SCATTER_SLICE rows at most
        for lo in range(int(bounds[t]), int(bounds[t + 1]), SCATTER_SLICE):
            batches.append((lo, min(int(bounds[t + 1]), lo + SCATTER_SLICE)))
        first.append(len(batches))
    index = json.dumps(first, separators=(",", ":")).encode()
    table = table.select(list(COLUMNS))
    schema = table.schema.with_metadata({TASK_BATCHES: index})
    # Sorted copies are taken a batch at a time: memory stays at the group plus one batch.
    slices = (table.take(pa.array(order[lo:hi])) for lo, hi in batches)
    write_scratch(path, slices, schema)
    return len(index)


def record_scatter(
    folder, plan: TaskPlan, groups: list[PartGroup], names: list[str], index_bytes: int
) -> None:
    """Mark a complete scatter: its plan, its groups and its files (a group without rows has
    none) with their sizes."""
    atomic_write_json(
        location(folder) / SCATTER_PLAN,
        {
            "plan": plan.key(),
            "groups": [g.part for g in groups],
            "files": {name: file_size(location(folder) / name) for name in names},
            "index_bytes": index_bytes,
        },
    )


def scatter_ready(folder, plan: TaskPlan, groups: list[PartGroup]) -> dict | None:
    """The paths and index bytes of a complete scatter made for this plan and these groups;
    None when there is none (or it was made for others, or a file is missing)."""
    record = read_json(location(folder) / SCATTER_PLAN)
    if not (
        isinstance(record, dict)
        and record.get("plan") == plan.key()
        and record.get("groups") == [g.part for g in groups]
        and files_intact(folder, record.get("files"))
    ):
        return None
    return {
        "paths": [location(folder) / name for name in sorted(record["files"])],
        "index_bytes": int(record.get("index_bytes", 0)),
    }
