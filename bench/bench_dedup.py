"""condense's exact in-cluster dedup core against three baselines, same data, same run, same machine.

    python bench/bench_dedup.py                                   # 1k-50k rows, 3 kinds (~20 min on 2 cores)
    python bench/bench_dedup.py --sizes 1000 5000 --repeat 3      # a quick look
    python bench/bench_dedup.py --methods condense bunny_bfs --kinds duplicate

Every method finds the near-duplicates of one synthetic cluster of 768-d float32 unit rows at
cosine threshold 0.86 (edge i-j iff dot(x_i, x_j) > 0.86):

- condense:  `condense.cores.components.components` (tiled upper triangle, angle pruning around
  a pivot, absorption of the pivot's group, union-find per tile).
- semdedup:  (a) SemDeDup as published: rows sorted by descending cosine distance to the
  centroid, the full n x n float32 matrix S = X X^T, its lower triangle and diagonal zeroed in
  place, M_j = max_{i<j} S_ij; rows with M > t are removed. Not connected components, so only its
  time, memory and number of removed rows are reported.
- bunny_bfs: (b) batched breadth-first search: take the first remaining row, pull in every
  remaining row above the threshold, grow the frontier with matrix products (frontier batches of
  1024 rows against the remaining rows) until nothing joins, remove the component, repeat.
- networkx:  (c) the dense S = X X^T, edges from its strict upper triangle above t (the boolean
  mask is taken from S, S is freed, the mask's lower triangle is cleared in place), a networkx
  Graph with every row as a node, `nx.connected_components`.

(a) and (c) compute S as `X @ X.T`, which numpy hands to BLAS ssyrk (n^2 d flops, like condense's
upper triangle). Above SYRK_MAX_ROWS rows that path segfaults here (numpy issue #19685), so they
multiply by a transposed copy instead (sgemm, 2 n^2 d flops); the table marks which one ran.

(b) and (c) label every row with its component's smallest row index, as condense does; their
labels must equal condense's exactly (a mismatch is reported and the script exits non-zero).

Three kinds of cluster (seeded), all around one centroid direction with row-to-centroid cosines
spread over ~0.5-0.85 like real CLIP clusters:

- typical:    Zipf-sized groups of near-duplicates (pairwise cos 0.93-0.97) covering half the
              rows; the other rows distinct (pairwise cos well below 0.86).
- singletons: the same with 5% of the rows in groups.
- duplicate:  88% of the rows one group of near-identical rows (pairwise cos ~0.96).

Each method and case runs in a fresh subprocess that generates the data from the seed (not
timed). Peak memory is the method's own: the child resets its peak RSS after generating the data
(/proc/self/clear_refs) and reports VmHWM minus the RSS at that moment. Seconds are the best of
--repeat runs, or of one run when it took longer than --cheap-seconds. The machine's float32
matmul rate is measured before and after the runs (best of five 4096x768 @ 768x4096 products;
the better of the two is used); condense's "matmul fraction" is 2 * dim * entries_computed /
seconds over that rate. Runs whose estimated memory
exceeds --mem-budget-gib, or (networkx) whose estimated graph build exceeds --max-seconds, are
skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THRESHOLD = 0.86
DIM = 768
KINDS = ("typical", "singletons", "duplicate")
METHODS = ("condense", "semdedup", "bunny_bfs", "networkx")
BASELINE_NAMES = {
    "semdedup": "(a) SemDeDup",
    "bunny_bfs": "(b) Bunny BFS",
    "networkx": "(c) networkx",
}
ZIPF_A = 1.8  # group-size exponent
NX_BYTES_PER_EDGE = 260  # a networkx Graph edge (two adjacency entries, an attr dict, int keys)
NX_SECONDS_PER_EDGE = 4e-6  # add_edges_from on this kind of machine
# numpy computes X @ X.T with OpenBLAS's ssyrk (half the flops of a general product), which
# segfaults on this machine from somewhere between 36k and 38k rows (numpy issue #19685); above
# this many rows the dense baselines multiply by a transposed copy instead (a general sgemm).
SYRK_MAX_ROWS = 32_768
GiB = 1 << 30
MiB = 1 << 20


# --------------------------------------------------------------------------- data


def group_sizes(kind: str, n: int, seed: int) -> list[int]:
    """The near-duplicate groups (sizes >= 2) of one case; every other row is distinct."""
    if kind == "duplicate":
        return [round(0.88 * n)]
    rng = np.random.default_rng([seed, KINDS.index(kind), n, 1])
    target = round((0.5 if kind == "typical" else 0.05) * n)
    cap = max(8, n // 50)  # the largest group: 2% of the cluster
    sizes: list[int] = []
    total = 0
    while target - total >= 2:
        size = min(int(rng.zipf(ZIPF_A)) + 1, cap, target - total)
        sizes.append(size)
        total += size
    return sizes


def _around(rng: np.random.Generator, centroid: np.ndarray, m: int, lo: float, hi: float):
    """m unit rows whose cosine to `centroid` is uniform in [lo, hi], in random directions."""
    cos = rng.uniform(lo, hi, m)
    u = rng.standard_normal((m, len(centroid)))
    u -= np.outer(u @ centroid, centroid)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return cos[:, None] * centroid + np.sqrt(1.0 - cos**2)[:, None] * u


def _group(rng: np.random.Generator, base: np.ndarray, m: int, pair_cos: float) -> np.ndarray:
    """m rows around `base` whose pairwise cosines are ~pair_cos: base + noise of norm^2 s2."""
    s2 = 1.0 / pair_cos - 1.0
    return base + math.sqrt(s2 / len(base)) * rng.standard_normal((m, len(base)))


def make_cluster(kind: str, n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """One synthetic cluster: (n, dim) float32 unit rows in random order."""
    sizes = group_sizes(kind, n, seed)
    rng = np.random.default_rng([seed, KINDS.index(kind), n, 2])
    centroid = rng.standard_normal(dim)
    centroid /= np.linalg.norm(centroid)
    distinct = _around(rng, centroid, n - sum(sizes), 0.5, 0.85)
    bases = _around(rng, centroid, len(sizes), 0.6, 0.85)
    parts = [distinct]
    for base, m in zip(bases, sizes, strict=True):
        pair_cos = 0.96 if kind == "duplicate" else rng.uniform(0.93, 0.97)
        parts.append(_group(rng, base, m, pair_cos))
    x = np.vstack(parts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[rng.permutation(n)], dtype=np.float32)


def expected(kind: str, n: int, seed: int) -> dict:
    """What the generator planted: components at the threshold, largest group, edges."""
    sizes = group_sizes(kind, n, seed)
    return {
        "components": n - sum(sizes) + len(sizes),
        "largest": max(sizes, default=1),
        "edges": sum(m * (m - 1) // 2 for m in sizes),
    }


# --------------------------------------------------------------------------- methods


def run_condense(x: np.ndarray, t: float, tile: int) -> tuple[np.ndarray, dict]:
    from condense.cores.components import components

    got = components(x, t, tile=tile)
    return got.labels[0], {
        "tiles_computed": got.tiles_computed,
        "tiles_total": got.tiles_total,
        "entries_computed": got.entries_computed,
        "absorbed": got.absorbed,
    }


def gram(x: np.ndarray) -> tuple[np.ndarray, str]:
    """S = X X^T as a numpy user writes it, and which BLAS product computed it."""
    if len(x) <= SYRK_MAX_ROWS:
        return x @ x.T, "syrk"
    return x @ np.ascontiguousarray(x.T), "gemm"


def _clear_lower(a: np.ndarray, value: float | bool) -> None:
    """Set the lower triangle and the diagonal of a square matrix to `value`, in place."""
    for i in range(len(a)):
        a[i, : i + 1] = value


def semdedup(x: np.ndarray, t: float) -> tuple[np.ndarray, dict]:
    """(a) SemDeDup: which rows it removes (bool mask, in the caller's row order)."""
    centroid = x.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    distance = 1.0 - x @ centroid
    order = np.argsort(-distance, kind="stable")  # farthest from the centroid first
    xs = x[order]
    s, product = gram(xs)
    _clear_lower(s, 0.0)
    m = s.max(axis=0)  # M_j = max_{i<j} S_ij
    del s
    removed = np.zeros(len(x), dtype=bool)
    removed[order] = m > t
    return removed, {"removed": int(removed.sum()), "product": product}


def bunny_bfs(x: np.ndarray, t: float, batch: int = 1024) -> tuple[np.ndarray, dict]:
    """(b) Batched breadth-first search, one component at a time from the first remaining row.

    The remaining rows live in a compact pool that is rebuilt once an eighth of it has been
    removed, so each product runs over little more than the rows that are still there.
    """
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    pool_idx = np.arange(n)
    pool = x
    products = 0
    for seed in range(n):
        if not alive[seed]:
            continue
        alive[seed] = False
        members = [np.array([seed])]
        frontier = members[0]
        while len(frontier):
            live = alive[pool_idx]
            if live.sum() * 8 < len(pool_idx) * 7:
                pool_idx = pool_idx[live]
                pool = x[pool_idx]
                live = np.ones(len(pool_idx), dtype=bool)
            if not len(pool_idx):
                break
            if len(frontier) == 1:
                hit = pool @ x[frontier[0]] > t
            else:
                hit = np.zeros(len(pool_idx), dtype=bool)
                for b0 in range(0, len(frontier), batch):
                    hit |= (x[frontier[b0 : b0 + batch]] @ pool.T > t).any(axis=0)
            products += 1
            frontier = pool_idx[hit & live]
            alive[frontier] = False
            members.append(frontier)
        labels[np.concatenate(members)] = seed  # the first remaining row is the smallest
    return labels, {"products": products}


def dense_networkx(x: np.ndarray, t: float) -> tuple[np.ndarray, dict]:
    """(c) Dense similarity matrix, edges of its strict upper triangle, networkx components."""
    import networkx as nx

    s, product = gram(x)
    above = s > t
    del s
    _clear_lower(above, False)
    ii, jj = np.nonzero(above)
    del above
    graph = nx.Graph()
    graph.add_nodes_from(range(len(x)))
    step = 1 << 20
    for k in range(0, len(ii), step):
        graph.add_edges_from(zip(ii[k : k + step].tolist(), jj[k : k + step].tolist(), strict=True))
    labels = np.empty(len(x), dtype=np.int64)
    for comp in nx.connected_components(graph):
        idx = np.fromiter(comp, dtype=np.int64, count=len(comp))
        labels[idx] = idx.min()
    return labels, {"edges": len(ii), "product": product}


# --------------------------------------------------------------------------- measuring


def matmul_gflops(m: int = 4096, k: int = DIM, repeats: int = 5) -> float:
    """This machine's float32 matmul rate: best of `repeats` (m x k) @ (k x m) products."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, m), dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * m * k / best / 1e9


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> tuple[int, bool]:
    """Reset this process's peak RSS to its current RSS; returns (that RSS, whether it worked)."""
    gc.collect()
    # Hand memory freed by the data generation back, so that reusing it counts as growth.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS"), True
    except OSError:  # fall back on ru_maxrss, which cannot be reset
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False


def peak_bytes(exact: bool) -> int:
    if exact:
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_method(method: str, x: np.ndarray, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    if method == "condense":
        return run_condense(x, THRESHOLD, args.tile)
    if method == "semdedup":
        return semdedup(x, THRESHOLD)
    if method == "bunny_bfs":
        return bunny_bfs(x, THRESHOLD, args.bfs_batch)
    if method == "networkx":
        return dense_networkx(x, THRESHOLD)
    raise ValueError(method)


def child(spec: dict, args: argparse.Namespace) -> None:
    """Generate one case, time one method on it, save its labels, print a JSON line."""
    method, kind, n = spec["method"], spec["kind"], spec["n"]
    x = make_cluster(kind, n, args.seed)
    base, exact = reset_peak()
    times: list[float] = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        labels, extra = run_method(method, x, args)
        times.append(time.perf_counter() - t0)
        if times[-1] > args.cheap_seconds:
            break
    peak = peak_bytes(exact) - base
    if method != "semdedup":
        np.save(Path(spec["out"]) / f"{method}-{kind}-{n}.npy", labels)
        extra["components"] = int(len(np.unique(labels)))
        extra["removed"] = n - extra["components"]
    print(
        json.dumps(
            {"seconds": min(times), "runs": times, "peak": peak, "exact_peak": exact, **extra}
        )
    )


# --------------------------------------------------------------------------- the parent


def estimate_bytes(method: str, n: int, edges: int, args: argparse.Namespace) -> int:
    data = 4 * n * DIM
    if method == "semdedup":
        return 4 * n * n + 2 * data
    if method == "networkx":
        return max(5 * n * n, n * n + 16 * edges) + NX_BYTES_PER_EDGE * edges + 200 * n
    if method == "bunny_bfs":
        return 2 * data + 5 * args.bfs_batch * n
    return 2 * data + 3 * 4 * args.tile**2


def skip_reason(method: str, n: int, plan: dict, args: argparse.Namespace) -> str | None:
    need = estimate_bytes(method, n, plan["edges"], args)
    if need > args.mem_budget_gib * GiB:
        return f"needs ~{need / GiB:.1f} GiB (budget {args.mem_budget_gib:.1f} GiB)" + (
            f": {plan['edges']:,} edges in networkx" if method == "networkx" else ""
        )
    if method == "networkx" and plan["edges"] * NX_SECONDS_PER_EDGE > args.max_seconds:
        return f"~{plan['edges'] * NX_SECONDS_PER_EDGE:.0f} s to build {plan['edges']:,} networkx edges"
    return None


def run_child(method: str, kind: str, n: int, out: Path, args: argparse.Namespace) -> dict:
    spec = json.dumps({"method": method, "kind": kind, "n": n, "out": str(out)})
    cmd = [sys.executable, __file__, "--child", spec, "--seed", str(args.seed)]
    cmd += ["--tile", str(args.tile), "--repeat", str(args.repeat)]
    cmd += ["--bfs-batch", str(args.bfs_batch), "--cheap-seconds", str(args.cheap_seconds)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {args.child_timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0]
        return {"failed": why}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_labels(method: str, kind: str, n: int, out: Path) -> str:
    """'ok' when the method's labels equal condense's, else a description of the difference."""
    ref_path, got_path = out / f"condense-{kind}-{n}.npy", out / f"{method}-{kind}-{n}.npy"
    if not ref_path.exists() or not got_path.exists():
        return "not compared"
    ref, got = np.load(ref_path), np.load(got_path)
    if np.array_equal(ref, got):
        return "ok"
    bad = np.flatnonzero(ref != got)
    return (
        f"MISMATCH: {len(bad)} rows differ (first {bad[:5].tolist()}: condense "
        f"{ref[bad[:5]].tolist()} vs {got[bad[:5]].tolist()}); components condense "
        f"{len(np.unique(ref))}, {method} {len(np.unique(got))}"
    )


def speedups(rows: list[dict]) -> None:
    """Condense's speedup vs min(time(a), time(c)) and vs time(b), per case."""
    cases: dict[tuple[int, str], dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["n"], row["kind"]), {})[row["method"]] = row
    for case in cases.values():
        cond = case.get("condense")
        if not cond or "seconds" not in cond:
            continue
        dense = [
            case[m]["seconds"] for m in ("semdedup", "networkx") if "seconds" in case.get(m, {})
        ]
        if dense:
            cond["vs_dense"] = min(dense) / cond["seconds"]
        if "seconds" in case.get("bunny_bfs", {}):
            cond["vs_bfs"] = case["bunny_bfs"]["seconds"] / cond["seconds"]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def print_table(rows: list[dict], rates: list[float], args: argparse.Namespace) -> None:
    gflops = max(rates)
    print()
    print(
        f"Machine float32 matmul rate: {gflops:.1f} GFLOP/s (best 4096x{DIM} @ {DIM}x4096; "
        f"{rates[0]:.1f} before the runs, {rates[-1]:.1f} after); threshold {THRESHOLD}, "
        f"dim {DIM}, tile {args.tile}, seed {args.seed}, load average {_loadavg()}"
    )
    print()
    head = (
        "| rows | kind | method | seconds | runs | peak MiB | matmul frac | tiles | removed rows "
        "| labels vs condense | condense speedup vs min(a,c) | vs (b) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        name = BASELINE_NAMES.get(r["method"], "condense")
        if "product" in r:
            name += f" [{r['product']}]"
        if "seconds" not in r:
            status = "skipped" if r["why"].startswith("skipped") else "failed"
            print(f"| {r['n']:,} | {r['kind']} | {name} | {status} | | | | | | {r['why']} | | |")
            continue
        frac = tiles = None
        if r["method"] == "condense":
            frac = 2 * DIM * r["entries_computed"] / r["seconds"] / 1e9 / gflops
            tiles = f"{r['tiles_computed']}/{r['tiles_total']}"
        print(
            f"| {r['n']:,} | {r['kind']} | {name} | {r['seconds']:.3f} | {len(r['runs'])} "
            f"| {r['peak'] / MiB:,.0f} | {_fmt(frac, '.2f')} | {tiles or ''} | {r['removed']:,} "
            f"| {r.get('check', '')} | {_fmt(r.get('vs_dense'), '.1f', 'x')} "
            f"| {_fmt(r.get('vs_bfs'), '.1f', 'x')} |"
        )


def progress_line(row: dict) -> str:
    parts = [
        f"  {row['method']:<10} {row['seconds']:8.3f} s",
        f"peak {row['peak'] / MiB:8,.0f} MiB",
    ]
    if "product" in row:
        parts.append(f"[{row['product']}]")
    parts.append(f"removed {row['removed']:,}")
    if "components" in row:
        parts.append(f"components {row['components']:,}")
    if row.get("check"):
        parts.append(f"[{row['check']}]")
    if row["method"] == "condense":
        parts.append(f"tiles {row['tiles_computed']}/{row['tiles_total']}")
        parts.append(f"absorbed {row['absorbed']:,}")
    return "  ".join(parts)


def parent(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rates = [matmul_gflops()]
    print(
        f"float32 matmul: {rates[0]:.1f} GFLOP/s; memory budget {args.mem_budget_gib:.1f} GiB; "
        f"load average {_loadavg()}"
    )
    out = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    rows: list[dict] = []
    failures: list[str] = []
    try:
        for n in args.sizes:
            for kind in args.kinds:
                plan = expected(kind, n, args.seed)
                print(
                    f"\n{n:,} rows, {kind}: planted {plan['components']:,} components "
                    f"({n - plan['components']:,} removable rows), largest group "
                    f"{plan['largest']:,}, {plan['edges']:,} edges above {THRESHOLD}"
                )
                for method in args.methods:
                    row = {"n": n, "kind": kind, "method": method}
                    why = skip_reason(method, n, plan, args)
                    result = {"failed": f"skipped: {why}"} if why else None
                    if result is None:
                        result = run_child(method, kind, n, out, args)
                    if "failed" in result:
                        row["why"] = result["failed"]
                        print(f"  {method:<10} {row['why']}")
                        rows.append(row)
                        continue
                    row.update(result)
                    if method in ("bunny_bfs", "networkx"):
                        row["check"] = check_labels(method, kind, n, out)
                        if row["check"] != "ok":
                            failures.append(f"{n} rows, {kind}, {method}: {row['check']}")
                    elif method == "semdedup":
                        row["check"] = "n/a (not components)"
                    elif row["components"] != plan["components"]:
                        row["check"] = (
                            f"{row['components']:,} components, planted {plan['components']:,}"
                        )
                    print(progress_line(row), flush=True)
                    rows.append(row)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    speedups(rows)
    rates.append(matmul_gflops())  # the machine's speed drifts: the better of the two counts
    print_table(rows, rates, args)
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s")
    for line in failures:
        print("LABEL MISMATCH " + line)
    return 1 if failures else 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GiB
    return 8.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeat", type=int, default=2, help="runs per method and case (best)")
    parser.add_argument(
        "--cheap-seconds",
        type=float,
        default=10.0,
        help="no further runs once one run took longer than this",
    )
    parser.add_argument("--tile", type=int, default=2048, help="condense's similarity tile")
    parser.add_argument("--bfs-batch", type=int, default=1024, help="(b)'s frontier batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mem-budget-gib",
        type=float,
        default=max(1.0, _available_gib() - 4.0),
        help="skip a run whose estimated memory exceeds this (default: available - 4 GiB)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="skip (c) when building its networkx graph would take longer than this",
    )
    parser.add_argument("--child-timeout", type=float, default=1200.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child), args)
        return
    sys.exit(parent(args))


if __name__ == "__main__":
    main()
