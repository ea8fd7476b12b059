"""The capacity plan of docs/scale.md: LAION-2B through the recipe on N nodes of 8 GPUs.

    python bench/capacity.py     # prints the tables docs/scale.md holds (make capacity)

Every figure is computed here from two lists:

- MEASURED on the 2-core development machine: the bytes each stage moves per row (the
  `_stage.json` counters of `make bench-scale`, its vectors in float16 units scaled to 768-d),
  its CPU seconds per row, and the share of dedup's similarities rechecked in float64;
- ASSUMED for the GPU nodes (no GPU has been measured yet): each node type's GPUs, cores,
  tensor-core and float64 rates, network, and the store's bandwidth per node.

A stage's time on N nodes is the largest of its CPU time, its GPU time, its bytes over the
store's bandwidth and (training) the partials' traffic into the driver, each spread over N.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# -- the recipe (configs/laion2b.yaml) ------------------------------------------------------
ROWS = 2.05e9  # LAION-2B-en pairs
DIM = 768  # ViT-L/14 embeddings
UNIT = 2 * DIM  # bytes of one float16 vector: the unit the counters are read in
K = 100_000  # clusters
SAMPLE = 20e6  # k-means training rows per round
ROUNDS, ITERS = 3, 10
CORESET = 2e6
SKEW = 4.0  # sum of cluster sizes squared over (rows^2 / k): LAION's clusters are heavy-tailed


@dataclass(frozen=True)
class NodeType:
    """ASSUMED: one GPU node, from its vendor's data sheet."""

    name: str
    gpus: int
    cores: int  # vCPUs, each counted as one of the development machine's cores
    fp16: float  # dense fp16/bf16 tensor-core FLOP/s per GPU (the screens' precision)
    fp64: float  # float64 FLOP/s per GPU (the exact rechecks)
    network: float  # bytes/s into one node (the driver's, for the k-means partials)


NODE_TYPES = (
    NodeType("A100 (p4d.24xlarge)", 8, 96, 312e12, 19.5e12, 50e9),
    NodeType("H100 (p5.48xlarge)", 8, 192, 989e12, 67e12, 400e9),
)
EFFICIENCY = 0.5  # of the peak rates, for large products with a top-k or threshold pass
BANDWIDTHS = (2e9, 5e9, 10e9)  # store bytes/s per node
NODES = (1, 8, 32)
RECHECK_FP16 = 0.01  # ASSUMED share of dedup's similarities within the fp16 screen's bound
WINDOW = 32  # candidates a GPU's assignment screen keeps (each rechecked row: <= 32 in float64)

FIGURES = Path(__file__).with_name("scale-figures.json")  # make bench-scale writes it
CORES_MEASURED = 2  # the development machine
# MEASURED by make bench-cluster at 768-d (500,000 float16 rows, 2 cores; docs/benchmarks.md):
# the scale run's d = 16 understates the per-row work on 768-d vectors.
# - embed read in place: checking, normalising and scoring: 31,149 rows/s on 2 cores;
# - the cluster stage's assignment and scatter at k = 1,000, 13.9 s: reading, normalising,
#   the distances in float64, the parts and the scatter, and (an upper bound: on a GPU they
#   move there) the products themselves on the CPU.
EMBED_768_ROWS_PER_CORE_S = 31_149 / 2
ASSIGN_768_CORE_SECONDS = 13.9 * 2 / 500_000


@dataclass(frozen=True)
class Measured:
    """Per-row costs from the scale run."""

    units: dict[str, float]  # float16 vector units read + written per input row, by stage
    other: dict[str, float]  # other bytes read + written per input row, by stage
    core_seconds: dict[str, float]  # CPU seconds per row (of the rows entering the stage)
    recheck_fp32: float  # dedup's rechecked pairs per similarity computed (fp32 screen)
    sample_units: float  # the scale run's training sample, in units per row


def measured(path=FIGURES) -> Measured:
    """Per-row costs from bench_scale.py's JSON (its counters, seconds and dedup's work)."""
    f = json.loads(Path(path).read_text())
    rows, unit = f["rows"], 2 * f["dim"]
    stages = f["stages"]
    units, other, cpu = {}, {}, {}
    for name, s in stages.items():
        vectors = s["vector_bytes_read"] + s["vector_bytes_written"]
        units[name] = vectors / rows / unit
        other[name] = (s["bytes_read"] + s["bytes_written"] - vectors) / rows
        # Per input row; export's per coreset row (its share of rows is the recipe's, not ours).
        per = s["rows_in"] if name == "export" else rows
        cpu[name] = s["seconds"] * CORES_MEASURED / max(1, per)
    cpu["embed"] = 1 / EMBED_768_ROWS_PER_CORE_S  # at 768-d, not the scale run's 16
    sample_rows = sum(r["rows"] for r in stages["cluster"].get("train_rounds", []))
    dedup = stages["dedup"]
    return Measured(
        units,
        other,
        cpu,
        dedup.get("pairs_rechecked", 0) / max(1, dedup.get("similarity_entries", 1)),
        sample_rows / rows,
    )


@dataclass
class Stage:
    name: str
    cpu: float  # core-seconds
    fp16: float  # FLOPs at tensor-core rates, over every GPU
    fp64: float  # FLOPs in float64, over every GPU
    bytes: float  # read + written, to the store
    driver: float = 0.0  # bytes into the driver's node (the k-means partials)

    def seconds(self, node: NodeType, nodes: int, bandwidth: float) -> tuple[float, str]:
        gpus = node.gpus * nodes * EFFICIENCY
        parts = {
            "CPU": self.cpu / (node.cores * nodes),
            "GPU": self.fp16 / (node.fp16 * gpus) + self.fp64 / (node.fp64 * gpus),
            "store I/O": self.bytes / (bandwidth * nodes),
            "driver network": self.driver * node.gpus * nodes / node.network,
        }
        name = max(parts, key=parts.get)
        return parts[name], name


def stages(m: Measured) -> list[Stage]:
    """The recipe's stages, their per-row costs scaled to LAION-2B at 768-d."""
    vec = lambda stage, units=None: ROWS * ((m.units[stage] if units is None else units) * UNIT)  # noqa: E731
    iterations = ROUNDS * ITERS
    assign_units = m.units["cluster"] - m.sample_units  # the scale run's sample read aside
    select = ("clip_band", "centroid_band", "sample")
    return [
        Stage(
            "embed (read in place)",
            cpu=ROWS * m.core_seconds["embed"],
            fp16=0,
            fp64=0,
            bytes=vec("embed") + ROWS * m.other["embed"],
        ),
        Stage(
            "cluster: train (Lloyd, every GPU)",
            cpu=0,
            fp16=2 * SAMPLE * K * DIM * iterations,
            fp64=2 * SAMPLE * WINDOW * DIM * iterations,  # as if every row were rechecked
            bytes=SAMPLE * ROUNDS * UNIT,
            driver=K * DIM * 8 * iterations,  # one int64 k x d partial per GPU per iteration
        ),
        Stage(
            "cluster: assign + scatter",
            cpu=ROWS * ASSIGN_768_CORE_SECONDS,
            fp16=2 * ROWS * K * DIM,
            fp64=2 * ROWS * WINDOW * DIM,
            bytes=vec("cluster", assign_units) + ROWS * m.other["cluster"],
        ),
        Stage(
            "dedup",
            cpu=ROWS * m.core_seconds["dedup"],
            fp16=2 * DIM * SKEW * ROWS**2 / (2 * K),  # the upper triangle, unpruned
            fp64=2 * DIM * SKEW * ROWS**2 / (2 * K) * RECHECK_FP16,
            bytes=vec("dedup") + ROWS * m.other["dedup"],
        ),
        Stage(
            "bands + sample",
            cpu=ROWS * sum(m.core_seconds[s] for s in select),
            fp16=0,
            fp64=0,
            bytes=ROWS * sum(m.other[s] for s in select),
        ),
        Stage(
            "export",
            cpu=CORESET * m.core_seconds["export"],
            fp16=0,
            fp64=0,
            bytes=ROWS * m.other["export"],  # reads the sample's flags of every row
        ),
    ]


def stage_table(m: Measured, node: NodeType, bandwidth: float) -> str:
    lines = [
        "| stage | read + written | FLOPs | bound by | "
        + " | ".join(f"{n} node{'s' * (n > 1)} (h)" for n in NODES)
        + " |",
        "|---|---:|---:|---|" + "---:|" * len(NODES),
    ]
    totals = [0.0] * len(NODES)
    for stage in stages(m):
        row = [stage.seconds(node, n, bandwidth) for n in NODES]
        for i, (secs, _) in enumerate(row):
            totals[i] += secs
        bound = sorted({b for _, b in row})
        lines.append(
            f"| {stage.name} | {stage.bytes / 1e12:.1f} TB | {stage.fp16 + stage.fp64:.1e} | "
            f"{', '.join(bound)} | " + " | ".join(f"{secs / 3600:.2f}" for secs, _ in row) + " |"
        )
    lines.append(
        "| **all stages** | | | | " + " | ".join(f"**{t / 3600:.2f}**" for t in totals) + " |"
    )
    return "\n".join(lines)


def hours(m: Measured, node: NodeType, nodes: int, bandwidth: float) -> tuple[float, str]:
    """The whole run's hours, and the bound of its longest stage."""
    timed = [(s.seconds(node, nodes, bandwidth), s.name) for s in stages(m)]
    (secs, bound), name = max(timed, key=lambda t: t[0][0])
    return sum(t[0][0] for t in timed) / 3600, f"{name}: {bound}"


def summary_table(m: Measured) -> str:
    lines = [
        "| node | store GB/s per node | "
        + " | ".join(f"{n} node{'s' * (n > 1)} (h)" for n in NODES)
        + " | longest stage on 1 node |",
        "|---|---:|" + "---:|" * len(NODES) + "---|",
    ]
    for node in NODE_TYPES:
        for bandwidth in BANDWIDTHS:
            cells = [hours(m, node, n, bandwidth) for n in NODES]
            lines.append(
                f"| {node.name} | {bandwidth / 1e9:g} | "
                + " | ".join(f"{h:.2f}" for h, _ in cells)
                + f" | {cells[0][1]} |"
            )
    return "\n".join(lines)


def inputs_table(m: Measured) -> str:
    rows = [
        (
            f"vector units per row, {s} (read + written)",
            f"{m.units[s]:.2f}",
            "measured: make bench-scale",
        )
        for s in ("embed", "cluster", "dedup")
    ]
    rows += [
        ("the scale run's training sample, units per row", f"{m.sample_units:.3f}", "measured"),
        ("other bytes per row, all stages", f"{sum(m.other.values()):,.0f}", "measured"),
        (
            "embed, rows/s per core at 768-d",
            f"{EMBED_768_ROWS_PER_CORE_S:,.0f}",
            "measured: make bench-cluster",
        ),
        (
            "assignment and scatter, rows/s per core at 768-d (CPU products included)",
            f"{1 / ASSIGN_768_CORE_SECONDS:,.0f}",
            "measured bound: make bench-cluster",
        ),
        (
            "dedup, bands + sample: CPU core-seconds per million input rows",
            f"{1e6 * m.core_seconds['dedup']:,.1f}, "
            f"{1e6 * sum(m.core_seconds[s] for s in ('clip_band', 'centroid_band', 'sample')):,.1f}",
            "measured: make bench-scale",
        ),
        ("dedup rechecks per similarity, fp32 screen", f"{m.recheck_fp32:.2e}", "measured"),
        ("dedup rechecks per similarity, fp16 screen", f"{RECHECK_FP16:g}", "assumed"),
        ("efficiency of the GPU peak rates", f"{EFFICIENCY:g}", "assumed"),
        ("cluster-size skew (sum n^2 / (R^2/k))", f"{SKEW:g}", "assumed"),
    ]
    for node in NODE_TYPES:
        rows.append(
            (
                f"{node.name}: GPUs, cores, fp16 / fp64 TFLOP/s per GPU, network GB/s",
                f"{node.gpus}, {node.cores}, {node.fp16 / 1e12:g} / {node.fp64 / 1e12:g}, "
                f"{node.network / 1e9:g}",
                "assumed: data sheet",
            )
        )
    lines = ["| input | value | source |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {source} |" for name, value, source in rows]
    return "\n".join(lines)


def report(m: Measured) -> str:
    """Everything docs/scale.md holds, as printed."""
    h100 = NODE_TYPES[1]
    parts = [
        inputs_table(m),
        f"Stage by stage, {h100.name} nodes, 5 GB/s per node to the store:",
        stage_table(m, h100, 5e9),
        "Whole runs:",
        summary_table(m),
    ]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale-json", default=str(FIGURES), help="figures written by bench_scale.py --json"
    )
    args = parser.parse_args()
    print(report(measured(args.scale_json)))


if __name__ == "__main__":
    main()
