"""The capacity plan of docs/scale.md: LAION-2B through the recipe on N nodes of 8 GPUs.

    python bench/capacity.py     # prints the tables docs/scale.md holds (make capacity)

Every figure is computed here from two lists: per-row costs MEASURED on the 2-core development
machine by the benchmarks (each names its source), and the ASSUMED hardware of a GPU node
(no GPU figure has been measured yet: the GPU rates are a peak times an efficiency, stated).
A stage's time is the largest of its CPU time, its GPU time and its bytes over the node's
bandwidth to the store, each spread over N nodes; one k-means trainer runs on one GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# -- the recipe (configs/laion2b.yaml) ------------------------------------------------------
ROWS = 2.05e9  # LAION-2B-en pairs
DIM = 768  # ViT-L/14 embeddings
K = 100_000  # clusters
SAMPLE = 20e6  # k-means training rows per round
ROUNDS, ITERS = 3, 10
CORESET = 2e6
STORED_BYTES = 2  # float16 vectors
META_BYTES = 120  # id, caption, url per row (LAION's median caption is ~50 characters)

# -- MEASURED here: per core of the 2-core machine (AVX2), the benchmark that gave each -------
MEASURED = {
    # embed of precomputed 768-d float16 embeddings: 14,565 rows/s on 2 cores
    # (make bench-cluster, docs/benchmarks.md#cluster): read, check, normalise, hash, write.
    "embed_rows_per_core_s": 14_565 / 2,
    # the cluster stage's per-row work besides the distance products (read a 768-d part, write
    # four columns): bounded by the embed stage's per-row cost, which reads and writes more.
    "assign_rows_per_core_s": 14_565 / 2,
    # dedup's control plane per row at the LAION shape (10M rows, 2,000 parts, k = 100,000:
    # make bench-scale): sizes, scatter, sort, keep rule, parts; filled in from its JSON.
    "dedup_rows_per_core_s": None,
    # the two bands and the sample together: 10M rows in 12.3 s on 2 cores (make bench-select)
    "select_rows_per_core_s": 10e6 / 12.3 / 2,
}
SCALE_RUN = {  # make bench-scale, 10M rows x 16-d, 2,000 parts, k = 100,000, 2 cores
    "rows": 10_000_000,
    "cores": 2,
    "dedup_seconds": None,
}

# -- ASSUMED: one GPU node (an AWS p4d.24xlarge, as deploy/ uses) -----------------------------
GPUS = 8  # A100 40 GB
CORES = 96  # vCPUs, each counted as one of this machine's cores
GPU_FP32 = 19.5e12  # A100 dense fp32 FLOP/s (faiss's flat search and dedup's tiles are fp32)
GPU_EFFICIENCY = 0.5  # of that peak, for large matrix products with a top-k / threshold pass
STORE_BYTES_PER_S = 2e9  # one node's sustained reads+writes to S3 (conservative for 400 Gb/s)
SKEW = 4.0  # sum of cluster sizes squared over (rows^2 / k): LAION's clusters are heavy-tailed


@dataclass
class Stage:
    name: str
    cpu: float  # core-seconds
    gpu_flops: float  # spread over every GPU of every node
    one_gpu_flops: float  # on one GPU whatever N is (the k-means trainer)
    bytes: float  # read + written, to the store
    bound_by: str = ""

    def seconds(self, nodes: int) -> tuple[float, str]:
        parts = {
            "CPU": self.cpu / (CORES * nodes),
            "GPU": self.gpu_flops / (GPU_FP32 * GPU_EFFICIENCY * GPUS * nodes)
            + self.one_gpu_flops / (GPU_FP32 * GPU_EFFICIENCY),
            "store I/O": self.bytes / (STORE_BYTES_PER_S * nodes),
        }
        name = max(parts, key=parts.get)
        return parts[name], name


def stages(measured: dict) -> list[Stage]:
    row = DIM * STORED_BYTES
    embed_bytes = ROWS * (2 * row + META_BYTES)  # img + txt + metadata
    return [
        Stage(
            "embed (precomputed)",
            cpu=ROWS / measured["embed_rows_per_core_s"],
            gpu_flops=0,
            one_gpu_flops=0,
            bytes=2 * embed_bytes,  # read the clip-retrieval files, write embed/
        ),
        Stage(
            "cluster: train",
            cpu=0,
            gpu_flops=0,
            one_gpu_flops=2 * SAMPLE * K * DIM * ITERS * ROUNDS,
            bytes=SAMPLE * ROUNDS * row,
        ),
        Stage(
            "cluster: assign",
            cpu=ROWS / measured["assign_rows_per_core_s"],
            gpu_flops=2 * ROWS * K * DIM,
            one_gpu_flops=0,
            bytes=ROWS * (row + 40),  # read img_emb, write id + 3 numbers
        ),
        Stage(
            "dedup",
            cpu=ROWS / measured["dedup_rows_per_core_s"],
            gpu_flops=2 * DIM * SKEW * ROWS**2 / (2 * K),  # the upper triangle, unpruned
            one_gpu_flops=0,
            bytes=ROWS * (3 * row + 60),  # read embed + cluster, write and read the scatter
        ),
        Stage(
            "bands + sample",
            cpu=ROWS / measured["select_rows_per_core_s"],
            gpu_flops=0,
            one_gpu_flops=0,
            bytes=ROWS * 3 * 30,
        ),
        Stage(
            "export",
            cpu=CORESET / measured["embed_rows_per_core_s"],
            gpu_flops=0,
            one_gpu_flops=0,
            bytes=CORESET * (2 * row + META_BYTES),
        ),
    ]


FIGURES = Path(__file__).with_name("scale-figures.json")  # make bench-scale writes it


def scale_figures(path=FIGURES) -> dict:
    """The scale run's rows and dedup seconds, from bench_scale.py's JSON."""
    figures = json.loads(Path(path).read_text())
    return {"rows": figures["rows"], "dedup_seconds": figures["stages"]["dedup"]["seconds"]}


def measured_costs(scale: dict | None = None) -> dict:
    measured = dict(MEASURED)
    run = {**SCALE_RUN, **(scale or {})}
    if run["dedup_seconds"] is None:
        raise SystemExit("no dedup figure: run make bench-scale, or pass --scale-json")
    measured["dedup_rows_per_core_s"] = run["rows"] / (run["dedup_seconds"] * run["cores"])
    return measured


def table(measured: dict, nodes=(1, 8, 32)) -> str:
    lines = [
        "| stage | read + written | FLOPs | bound by | "
        + " | ".join(f"{n} node{'s' * (n > 1)} (h)" for n in nodes)
        + " |",
        "|---|---:|---:|---|" + "---:|" * len(nodes),
    ]
    totals = [0.0] * len(nodes)
    for stage in stages(measured):
        flops = stage.gpu_flops + stage.one_gpu_flops
        row = [stage.seconds(n) for n in nodes]
        for i, (secs, _) in enumerate(row):
            totals[i] += secs
        bound = sorted({b for _, b in row})
        lines.append(
            f"| {stage.name} | {stage.bytes / 1e12:.1f} TB | {flops:.1e} | {', '.join(bound)} | "
            + " | ".join(f"{secs / 3600:.2f}" for secs, _ in row)
            + " |"
        )
    lines.append(
        "| **all stages** | | | | " + " | ".join(f"**{t / 3600:.1f}**" for t in totals) + " |"
    )
    return "\n".join(lines)


def inputs_table(measured: dict) -> str:
    lines = ["| input | value | source |", "|---|---:|---|"]
    rows = [
        (
            "embed, rows/s per core (768-d float16)",
            measured["embed_rows_per_core_s"],
            "measured: make bench-cluster",
        ),
        (
            "assign, rows/s per core besides the products",
            measured["assign_rows_per_core_s"],
            "measured bound: the embed figure",
        ),
        (
            "dedup, rows/s per core (control plane)",
            measured["dedup_rows_per_core_s"],
            "measured: make bench-scale",
        ),
        (
            "bands + sample, rows/s per core",
            measured["select_rows_per_core_s"],
            "measured: make bench-select",
        ),
        ("GPUs per node", GPUS, "assumed: A100 40 GB (p4d.24xlarge)"),
        ("cores per node", CORES, "assumed"),
        (
            "GPU fp32 FLOP/s used",
            GPU_FP32 * GPU_EFFICIENCY,
            f"assumed: {GPU_FP32:.1e} peak x {GPU_EFFICIENCY}",
        ),
        ("store bytes/s per node", STORE_BYTES_PER_S, "assumed"),
        ("cluster-size skew (sum n^2 / (R^2/k))", SKEW, "assumed"),
    ]
    for name, value, source in rows:
        lines.append(
            f"| {name} | {value:,.0f} | {source} |"
            if value >= 100
            else f"| {name} | {value:g} | {source} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale-json", default=str(FIGURES), help="figures written by bench_scale.py --json"
    )
    args = parser.parse_args()
    measured = measured_costs(scale_figures(args.scale_json))
    print(inputs_table(measured))
    print()
    print(table(measured))


if __name__ == "__main__":
    main()
