"""Benchmark: the whole funnel with the run directory on a local disk and in an object store.

    python bench/bench_store.py [--rows 400000 --dim 64 --parts 40 --k 400]

The same synthetic corpus (the input in the store too, for the store's run) goes through every
stage on one local Ray, once with RUN on this machine's disk and once in a real S3 server on
127.0.0.1 (SeaweedFS `weed mini`, as the tests run it). It prints each stage's seconds side by
side and their ratio: what uploads under final names, create-only marks and byte-range reads of
the dedup scatter (instead of memory maps) cost against a local disk, on one machine where the
store's network is a loopback. Both runs must write the same parts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from condense.config import config_from_dict  # noqa: E402
from condense.pipeline.runner import run_pipeline  # noqa: E402
from condense.storage.fs import location, put_tree  # noqa: E402
from condense.storage.parts import part_files, read_table  # noqa: E402
from condense.synth import SynthConfig, generate  # noqa: E402
from tests.conftest import S3_ENV, S3_PORTS  # noqa: E402 (sets the store's environment first)
from tests.s3server import SeaweedFS  # noqa: E402

STAGES = ("embed", "cluster", "dedup", "clip_band", "centroid_band", "sample", "export")


def config(corpus: str, rows: int, parts: int, k: int):
    return config_from_dict(
        {
            "input": {"kind": "embeddings", "path": corpus},
            "embed": {"rows_per_part": -(-rows // parts)},
            "cluster": {"k": k, "sample_size": rows},
            "dedup": {"rows_per_task": max(1, rows // 8), "scatter_rows": max(1, rows // 4)},
            "sample": {"n": rows // 20},
            "ray": {"progress": False},
        },
        "bench-store",
    )


def seconds_by_stage(root) -> dict[str, float]:
    from condense.storage.files import read_json

    return {s: read_json(location(root) / s / "_stage.json")["seconds"] for s in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--parts", type=int, default=40)
    parser.add_argument("--k", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        generate(corpus, SynthConfig(n=args.rows, dim=args.dim, rows_per_file=args.rows // 4))
        (work / "weed").mkdir()
        with SeaweedFS(work / "weed", S3_PORTS, S3_ENV["S3_BUCKET"]):
            store = f"s3://{S3_ENV['S3_BUCKET']}/bench-{os.getpid()}"
            put_tree(corpus, f"{store}/corpus")
            timings = {}
            for where, corpus_path, run in (
                ("local disk", str(corpus), str(work / "run")),
                ("object store", f"{store}/corpus", f"{store}/run"),
            ):
                start = time.perf_counter()
                run_pipeline(
                    config(corpus_path, args.rows, args.parts, args.k), run, log=lambda _: None
                )
                timings[where] = (time.perf_counter() - start, seconds_by_stage(run))
            for stage in STAGES:
                local = read_table(part_files(work / "run" / stage))
                remote = read_table(part_files(location(f"{store}/run") / stage))
                if stage != "embed":  # embed's `source` names the input file, the same here
                    assert remote.equals(local), f"{stage}: the two runs differ"
                else:
                    assert remote.num_rows == local.num_rows
    print(
        f"funnel on {args.rows:,} rows x {args.dim}-d, {args.parts} parts, k={args.k}: "
        "run directory on a local disk vs in SeaweedFS on 127.0.0.1 (same Ray, same output)"
    )
    print(f"{'stage':<15}{'local s':>10}{'store s':>10}{'store/local':>13}")
    for stage in STAGES:
        a, b = timings["local disk"][1][stage], timings["object store"][1][stage]
        print(f"{stage:<15}{a:>10.2f}{b:>10.2f}{b / a:>12.2f}x")
    a, b = timings["local disk"][0], timings["object store"][0]
    print(f"{'whole run':<15}{a:>10.2f}{b:>10.2f}{b / a:>12.2f}x")


if __name__ == "__main__":
    main()
