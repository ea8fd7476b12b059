"""Benchmark: a LAION-shaped run (many parts, many clusters) through the whole funnel.

    python bench/bench_scale.py                                   # 10M rows, 2,000 parts, k=100,000
    python bench/bench_scale.py --rows 200000 --parts 500 --k 20000   # the shape make test runs

The dimension is small (d=16 by default): it scales the arithmetic, not the control plane this
benchmark is about (part files, records, scatter files, cluster offsets, task plans). It writes
a synthetic clip-retrieval corpus (in a child process, so its memory is not the driver's), runs
every stage on a local Ray with the driver in this process, and prints:

- each stage's seconds, and per part and per cluster where the stage's work is cut that way;
- the driver's peak memory during the run (the kernel's high-water mark, reset before the run);
- the dedup scatter's index bytes and the files each dedup task opened, against their bounds;
- the bytes each stage moved through the storage layer per input row (its `_stage.json`
  counters), and the vectors among them in units of one float16 vector of the run's dimension
  (2 x dim bytes: 1,536 at LAION's 768).

`--json FILE` also writes the figures as JSON (docs/scale.md's capacity plan reads them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from condense.config import config_from_dict
from condense.pipeline.runner import run_pipeline
from condense.storage.rundir import RunDir

GIANT = 0.001  # the synthetic "no object" cluster: kept small, it is arithmetic, not control


def write_corpus(out: Path, rows: int, dim: int, rows_per_file: int, seed: int = 0) -> float:
    """The synthetic corpus, written by a child process; returns its seconds."""
    code = (
        "import sys; from condense.synth import SynthConfig, generate; "
        f"generate(sys.argv[1], SynthConfig(n={rows}, dim={dim}, seed={seed}, "
        f"rows_per_file={rows_per_file}, giant_fraction={GIANT}))"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    return time.perf_counter() - start


def reset_peak() -> None:
    """Reset this process's peak resident memory (Linux: /proc/self/clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_bytes() -> int:
    """This process's peak resident memory since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def scale_config(
    corpus: Path, rows: int, parts: int, k: int, niter: int, executor: str, dedup: dict
):
    return config_from_dict(
        {
            "input": {"kind": "embeddings", "path": str(corpus)},
            "embed": {"rows_per_part": -(-rows // parts), "dtype": "float16"},  # the recipe's
            "cluster": {"k": k, "niter": niter, "sample_size": min(rows, 4 * k)},
            "dedup": {"thresholds": [0.8, 0.86, 0.9], **dedup},
            "sample": {"n": max(1, rows // 20)},
            "ray": {"progress": False},
            "executor": executor,
        },
        "bench-scale",
    )


def measure(
    rows: int,
    parts: int,
    k: int,
    dim: int,
    niter: int,
    work: Path,
    executor: str = "ray",
    dedup: dict | None = None,
) -> dict:
    """Run the funnel once at this shape in `work` (`dedup`: settings of that section);
    returns its figures."""
    corpus = work / "corpus"
    corpus_seconds = write_corpus(corpus, rows, dim, rows_per_file=max(1, rows // 20))
    config = scale_config(corpus, rows, parts, k, niter, executor, dedup or {})
    run_dir = work / "run"
    reset_peak()
    start = time.perf_counter()
    run_pipeline(config, run_dir, log=lambda line: None)
    seconds = time.perf_counter() - start
    driver_peak = peak_bytes()
    run = RunDir(run_dir)
    stages = {}
    for name in ("embed", "cluster", "dedup", "clip_band", "centroid_band", "sample", "export"):
        mark = run.stage_mark(name)
        stages[name] = {
            key: mark.get(key)
            for key in (
                "seconds",
                "parts",
                "rows_in",
                "rows_out",
                "train_seconds",
                "assign_seconds",
                "scatter_seconds",
                "components_seconds",
                "tasks",
                "clusters",
                "scatter",
                "bytes_read",
                "bytes_written",
                "vector_bytes_read",
                "vector_bytes_written",
                "train_rounds",
                "pairs_rechecked",
                "similarity_entries",
            )
            if mark.get(key) is not None
        }
    return {
        "rows": rows,
        "parts": parts,
        "k": k,
        "dim": dim,
        "niter": niter,
        "corpus_seconds": round(corpus_seconds, 1),
        "run_seconds": round(seconds, 1),
        "driver_peak_bytes": driver_peak,
        "stages": stages,
    }


def report(figures: dict) -> None:
    rows, parts, k = figures["rows"], figures["parts"], figures["k"]
    print(
        f"LAION-shaped run: {rows:,} rows x {figures['dim']}-d, {parts:,} parts, k={k:,} "
        f"({figures['niter']} k-means iterations); corpus written in "
        f"{figures['corpus_seconds']} s"
    )
    print(f"{'stage':<15}{'seconds':>10}{'ms/part':>10}{'us/cluster':>12}  notes")
    for name, s in figures["stages"].items():
        secs = s["seconds"]
        per_part = 1000 * secs / max(1, s.get("parts", parts))
        notes = []
        for key in ("train_seconds", "assign_seconds", "scatter_seconds", "components_seconds"):
            if key in s:
                notes.append(f"{key.removesuffix('_seconds')} {s[key]:.1f} s")
        if "tasks" in s:
            notes.append(f"{s['tasks']} tasks")
        per_cluster = f"{1e6 * secs / k:>12.0f}" if name in ("cluster", "dedup") else f"{'':>12}"
        print(f"{name:<15}{secs:>10.1f}{per_part:>10.1f}{per_cluster}  {', '.join(notes)}")
    print(f"whole run: {figures['run_seconds']} s")
    print(bytes_table(figures))
    print(f"driver peak memory: {figures['driver_peak_bytes'] / 2**20:,.0f} MiB")
    scatter = figures["stages"]["dedup"].get("scatter")
    if scatter:
        print(
            f"dedup scatter: {scatter['files']} files, their task indexes {scatter['index_bytes']:,} "
            f"bytes in all (tasks + 1 batch numbers each; k + 1 offsets per part would be "
            f"{8 * (k + 1) * parts:,}); at most {scatter['max_files_per_task']} files read by "
            "one task"
        )


def bytes_table(figures: dict) -> str:
    """Bytes each stage moved per input row, and the vectors among them in float16 units."""
    rows, unit = figures["rows"], 2 * figures["dim"]
    lines = [
        f"{'stage':<15}{'read B/row':>12}{'written B/row':>15}{'vector units r + w':>20}",
    ]
    total_units = 0.0
    for name, s in figures["stages"].items():
        if "bytes_read" not in s:
            continue
        units = (s["vector_bytes_read"] + s["vector_bytes_written"]) / rows / unit
        total_units += units
        lines.append(
            f"{name:<15}{s['bytes_read'] / rows:>12,.1f}{s['bytes_written'] / rows:>15,.1f}"
            f"{s['vector_bytes_read'] / rows / unit:>10.2f} + {s['vector_bytes_written'] / rows / unit:<7.2f}"
        )
    lines.append(f"vector units moved per input row, input to coreset: {total_units:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--parts", type=int, default=2000)
    parser.add_argument("--k", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--executor", default="ray", choices=["ray", "local"])
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        figures = measure(
            args.rows, args.parts, args.k, args.dim, args.niter, Path(tmp), args.executor
        )
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
