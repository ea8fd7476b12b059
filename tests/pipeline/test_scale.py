"""The LAION shape in small: 500 embed parts and 20,000 clusters through the whole funnel, on
the session's Ray, with the memory bounds of docs/benchmarks.md asserted (`make bench-scale`
runs the full shape with the same code)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from condense.storage.rundir import RunDir

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_scale.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_laion_shape_in_small(ray_session, tmp_path):
    bench = load_bench()
    rows, parts, k = 100_000, 500, 20_000
    before = rss_bytes()
    figures = bench.measure(
        rows,
        parts,
        k,
        dim=16,
        niter=2,
        work=tmp_path,
        dedup={"rows_per_task": 30_000, "scatter_rows": 20_000},
    )
    stages = figures["stages"]
    assert [s["rows_in"] for s in stages.values()][:3] == [rows, rows, rows]
    assert stages["embed"]["parts"] == parts and stages["cluster"]["parts"] == parts
    # The driver holds no rows and nothing per cluster beyond k-vectors: a bounded growth.
    assert figures["driver_peak_bytes"] - before < 400 * 2**20
    # The dedup scatter: one file per 20,000 rows, each with a task index of tasks + 1 batch
    # numbers (not k + 1 offsets per part), and no task reads more files than there are.
    scatter = stages["dedup"]["scatter"]
    tasks = stages["dedup"]["tasks"]
    assert scatter["files"] == rows // 20_000
    assert 2 * (tasks + 1) * scatter["files"] <= scatter["index_bytes"]
    assert scatter["index_bytes"] <= 8 * (tasks + 1) * scatter["files"]
    assert 1 <= scatter["max_files_per_task"] <= scatter["files"]
    assert tasks >= 3  # the clusters were packed into several tasks
    assert not (RunDir(tmp_path / "run").stage_dir("dedup") / "_by_cluster").exists()
