"""Cluster stage on Ray against bare faiss, same data, same run, same machine.

    python bench/bench_cluster.py                       # 1M x 768, k = 1,000 (~15 min on 2 cores)
    python bench/bench_cluster.py --rows 100000 --k 100  # a quick look

Two comparisons, each side's best of `--repeats` interleaved runs:

- training: condense's Lloyd trainer (`cluster.trainer: lloyd`) at 1 and 2 workers (the
  machine's CPUs shared between them) against bare `faiss.Kmeans` trained on the very same
  sample, from the same first centroids, for the same iterations, with every CPU; it also
  prints how far apart the two sets of centroids end;
- the whole stage (train, assign every row, write the parts and dedup's scatter) against bare
  faiss training and `index.search` of the rows already in memory (target: <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def bare_faiss(x: np.ndarray, k: int, niter: int, sample: int, seed: int) -> dict:
    """The baseline: faiss.Kmeans on a random sample of the in-memory rows, then index.search."""
    import faiss

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))]
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=-(-len(train) // k)
    )
    km.train(train)
    t1 = time.perf_counter()
    _, ids = km.index.search(x, 1)
    t2 = time.perf_counter()
    return {
        "train_s": t1 - t0,
        "assign_s": t2 - t1,
        "total_s": t2 - t0,
        "clusters": int(len(np.unique(ids))),
    }


def faiss_on_sample(sample: np.ndarray, k: int, niter: int) -> dict:
    """faiss.Kmeans on exactly condense's sample, from its first k rows (as Lloyd starts)."""
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(
        sample.shape[1], k, niter=niter, seed=0, max_points_per_centroid=-(-len(sample) // k)
    )
    km.train(sample, init_centroids=np.ascontiguousarray(sample[:k]))
    return {"seconds": time.perf_counter() - t0, "centroids": km.centroids.copy()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument(
        "--sample",
        type=int,
        default=256_000,
        help="training rows (faiss's default: 256 per centroid)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float16",
        help="embed.dtype: how embed/ stores vectors (the LAION recipe uses float16)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)

    from condense.config import config_from_dict
    from condense.pipeline.runner import run_pipeline
    from condense.runtime import RayConfig
    from condense.runtime.ray import init_ray
    from condense.synth import SynthConfig, generate

    out = Path(args.out)
    data = out / f"synth-{args.rows}x{args.dim}"
    if not (data / "synth.json").exists():
        t = time.perf_counter()
        generate(data, SynthConfig(n=args.rows, dim=args.dim, seed=0, rows_per_file=100_000))
        print(f"generated {args.rows:,} x {args.dim} in {time.perf_counter() - t:.1f} s")
    run_dir = out / f"run-{args.dtype}"
    # embed/ is reused when it was built from the same data; the cluster stage always reruns.
    cpus = os.cpu_count() or 1
    init_ray(RayConfig(num_cpus=cpus))
    cfg = config_from_dict(
        {
            "input": {"kind": "embeddings", "path": str(data)},
            "embed": {"rows_per_part": 100_000, "dtype": args.dtype},
            "cluster": {"k": args.k, "niter": args.niter, "sample_size": args.sample, "seed": 0},
            "ray": {"progress": False},
        },
        "bench",
    )
    run_pipeline(cfg, run_dir, log=print, progress=False, until="embed")
    embed = json.loads((run_dir / "embed" / "_stage.json").read_text())

    # The baseline gets the same rows, already in memory (its load is not timed).
    from condense.cores.vectors import to_unit_float32
    from condense.schema import IMG_EMB, arrow_to_vectors
    from condense.stages.cluster.sample import draw_sample
    from condense.stages.embed.vectors import EmbedVectors

    vectors = EmbedVectors.of(run_dir / "embed")
    parts = sorted(p.stem.removeprefix("part-") for p in (run_dir / "embed").glob("part-*.parquet"))
    x = np.ascontiguousarray(
        np.concatenate(
            [
                to_unit_float32(arrow_to_vectors(vectors.read(p, [IMG_EMB]).column(IMG_EMB)))
                for p in parts
            ]
        )
    )
    sample = draw_sample(parts, vectors, len(x), min(args.sample, len(x)), seed=0)
    import faiss

    faiss.omp_set_num_threads(cpus)
    # Interleaved and repeated: this machine's speed drifts, so each side keeps its best run.
    stage_runs: dict[int, list] = {1: [], 2: []}
    base_runs, faiss_train = [], []
    for _ in range(args.repeats):
        base_runs.append(bare_faiss(x, args.k, args.niter, args.sample, seed=0))
        faiss_train.append(faiss_on_sample(sample, args.k, args.niter))
        for workers in stage_runs:
            shutil.rmtree(run_dir / "cluster", ignore_errors=True)
            wcfg = cfg.model_copy(
                update={
                    "cluster": cfg.cluster.model_copy(
                        update={"train_workers": workers, "threads_per_worker": cpus // workers}
                    )
                }
            )
            run_pipeline(wcfg, run_dir, log=lambda _: None, progress=False, until="cluster")
            mark = json.loads((run_dir / "cluster" / "_stage.json").read_text())
            mark["centroids"] = np.load(run_dir / "cluster" / "centroids.npy")
            stage_runs[workers].append(mark)
    base = min(base_runs, key=lambda r: r["total_s"])
    trained = min(faiss_train, key=lambda r: r["seconds"])
    print()
    print(
        f"machine: {cpus} CPUs; rows {args.rows:,} x {args.dim} ({args.dtype}), k {args.k}, "
        f"niter {args.niter}, training rows {len(sample):,}; best of {args.repeats}"
    )
    print(f"embed stage:   {embed['seconds']:8.1f} s  {embed['rows_per_second']:>12,.0f} rows/s")
    print()
    print("training on the same sample from the same start:")
    print(f"  bare faiss.Kmeans, {cpus} threads: {trained['seconds']:7.1f} s")
    for workers, runs in stage_runs.items():
        best = min(runs, key=lambda r: r["train_seconds"])
        train = best["train_seconds"] - sum(r["sample_seconds"] for r in best["train_rounds"])
        gap = float(np.abs(best["centroids"] - trained["centroids"]).max())
        print(
            f"  condense Lloyd, {workers} worker{'s' * (workers > 1)} x {cpus // workers} "
            f"thread{'s' * (cpus // workers > 1)}: {train:7.1f} s  ({train / trained['seconds']:.2f}x "
            f"faiss; drawing the sample {best['train_seconds'] - train:.1f} s more); centroids "
            f"within {gap:.1e} of faiss's"
        )
    print()
    for workers, runs in stage_runs.items():
        cluster = min(runs, key=lambda r: r["seconds"])
        print(
            f"cluster stage, {workers} training worker{'s' * (workers > 1)}: "
            f"{cluster['seconds']:8.1f} s  (train {cluster['train_seconds']:.1f} s, assign and "
            f"scatter {cluster['assign_seconds']:.1f} s)   runs: "
            + ", ".join(f"{r['seconds']:.1f}" for r in runs)
            + f";  {cluster['seconds'] / base['total_s']:.2f}x bare faiss"
        )
    print(
        f"bare faiss:    {base['total_s']:8.1f} s  (train {base['train_s']:.1f} s, "
        f"assign {base['assign_s']:.1f} s)   runs: "
        + ", ".join(f"{r['total_s']:.1f}" for r in base_runs)
    )


if __name__ == "__main__":
    main()
