"""LAION-like synthetic embeddings in the clip-retrieval layout, with their ground truth.

    condense synth --out data/synth --n 100000 --dim 768 --seed 0

What it plants (all seeded):
- semantic topics: every row is near one of `topics` random directions (k-means should find them);
- near-duplicate groups with heavy-tailed (Zipf) sizes, members pairwise cos ~0.93;
- chains A~B~C(~D) of 3-4 rows: neighbours cos ~0.92, two apart ~0.70, so only the graph joins them;
- one giant cluster of near-identical rows (LAION's "no object" images), a few % of rows;
- singletons, pairwise cos ~0.5 within a topic;
- text embeddings with cos(image, text) ~ N(0.30, 0.07): clip scores spread like real ones.

The ground truth goes to `truth.parquet` beside the data: sample_id, topic, group_id (-1 for a
singleton), kind (single, dup, chain, giant).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from condense.schema import (
    CAPTION,
    GROUP_ID,
    KEPT,
    SAMPLE_ID,
    URL,
)
from condense.strict import StrictModel

DUP_COS = 0.93  # target pairwise cosine inside a duplicate group
CHAIN_COS = 0.92  # cosine between neighbours of a chain (two apart: cos(2 theta) ~ 0.69)
GIANT_COS = 0.99  # pairwise cosine inside the giant cluster
TOPIC_COS = 0.5  # pairwise cosine of unrelated rows of one topic


class SynthConfig(StrictModel):
    """Shape of a synthetic corpus."""

    n: int = Field(20_000, ge=1)  # rows
    dim: int = Field(64, ge=8)  # embedding dimension
    seed: int = 0  # everything below is drawn from this seed
    topics: int | None = Field(None, ge=1)  # semantic topics; None: n / 2,000 (at least 8)
    rows_per_file: int = Field(10_000, ge=1)  # rows per img_emb_N.npy file
    dup_fraction: float = Field(0.62, ge=0.0, le=1.0)  # rows inside duplicate groups and chains
    chain_fraction: float = Field(0.1, ge=0.0, le=1.0)  # share of groups that are chains
    giant_fraction: float = Field(0.03, ge=0.0, le=1.0)  # rows in the giant near-identical cluster
    dtype: str = "float16"  # stored precision of the .npy files (float16 like clip-retrieval)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Rows of ~unit norm, nearly orthogonal to everything else in high dimension."""
    return rng.standard_normal((n, dim), dtype=np.float32) / np.float32(math.sqrt(dim))


def plan_rows(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Decide each row's role: topic, group, kind and position inside its group."""
    n = cfg.n
    topics = cfg.topics or max(8, n // 2000)
    n_giant = int(round(cfg.giant_fraction * n))
    budget = int(round(cfg.dup_fraction * n))
    budget = min(budget, n - n_giant)
    sizes = []
    while budget >= 2:
        size = int(min(budget, max(2, rng.zipf(2.2) + 1), 500))
        if budget - size == 1:
            size += 1
        sizes.append(size)
        budget -= size
    n_groups = len(sizes)
    is_chain = rng.random(n_groups) < cfg.chain_fraction
    for g in np.flatnonzero(is_chain):
        sizes[g] = max(3, min(sizes[g], 4))  # chains of 3..4: long enough to need the graph
    group_rows = int(sum(sizes))
    if group_rows > n - n_giant:  # chains grew a few groups: give the rows back from the largest
        largest = int(np.argmax(sizes))
        sizes[largest] -= group_rows - (n - n_giant)
        group_rows = int(sum(sizes))
    n_single = n - n_giant - group_rows
    kind = np.concatenate(
        [
            np.full(n_single, 0, np.int8),
            np.concatenate(
                [np.full(s, 2 if c else 1, np.int8) for s, c in zip(sizes, is_chain, strict=True)]
            )
            if sizes
            else np.zeros(0, np.int8),
            np.full(n_giant, 3, np.int8),
        ]
    )
    group = np.concatenate(
        [
            np.full(n_single, -1, np.int64),
            np.repeat(np.arange(n_groups), sizes) if sizes else np.zeros(0, np.int64),
            np.full(n_giant, n_groups, np.int64),
        ]
    )
    member = np.concatenate(
        [
            np.zeros(n_single, np.int64),
            np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64),
            np.arange(n_giant),
        ]
    )
    group_topic = rng.integers(0, topics, n_groups)
    topic = np.concatenate(
        [
            rng.integers(0, topics, n_single),
            np.repeat(group_topic, sizes) if sizes else np.zeros(0, np.int64),
            np.full(n_giant, topics),  # the giant cluster is a topic of its own
        ]
    )
    order = rng.permutation(n)  # spread every group over the files
    return {
        "kind": kind[order],
        "group": group[order],
        "member": member[order],
        "topic": topic[order],
        "n_groups": np.array(n_groups),
        "n_topics": np.array(topics),
    }


KIND_NAMES = np.array(["single", "dup", "chain", "giant"])
# Metadata row groups: an embed part smaller than a file (the LAION-shaped benchmark's 5,000
# rows) reads the groups holding its rows, not the whole file. The recipe's parts are whole
# files (1M rows), so there its reads are the same either way.
METADATA_ROW_GROUP = 8192


def _chain_lengths(plan: dict[str, np.ndarray], n_groups: int) -> np.ndarray:
    """Members per group id (over the whole corpus, not one file)."""
    groups = plan["group"][plan["group"] >= 0]
    return np.bincount(groups, minlength=n_groups + 1)


@dataclass
class _Geometry:
    """The directions every file's rows are drawn around: topic centres, each group's base row
    and (for chains) the direction it turns to, and the noise scales of each kind."""

    centers: np.ndarray
    bases: np.ndarray
    turn: np.ndarray
    spread: float
    dup_eps: float
    giant_eps: float
    theta: float
    chain_len: np.ndarray


def _geometry(cfg: SynthConfig, rng: np.random.Generator, plan: dict) -> _Geometry:
    dim = cfg.dim
    n_groups, n_topics = int(plan["n_groups"]), int(plan["n_topics"])
    centers = _unit(rng.standard_normal((n_topics + 1, dim)).astype(np.float32))
    # Topic members: cos(a, b) = s^2 / (s^2 + 1) for unit noise, so s = sqrt(c / (1 - c)).
    spread = math.sqrt(TOPIC_COS / (1 - TOPIC_COS))
    group_of = plan["group"]
    topic_of_group = np.zeros(n_groups + 1, np.int64)
    mask = group_of >= 0
    topic_of_group[group_of[mask]] = plan["topic"][mask]
    bases = _unit(spread * centers[topic_of_group] + _noise(rng, n_groups + 1, dim))
    bases[n_groups] = centers[n_topics]
    turn = _noise(rng, n_groups + 1, dim)
    turn = _unit(turn - np.sum(turn * bases, axis=1, keepdims=True) * bases)  # orthogonal to base
    return _Geometry(
        centers=centers,
        bases=bases,
        turn=turn,
        spread=spread,
        dup_eps=math.sqrt(1 / DUP_COS - 1),  # m = b + eps*u: cos(m_i, m_j) = 1 / (1 + eps^2)
        giant_eps=math.sqrt(1 / GIANT_COS - 1),
        theta=math.acos(CHAIN_COS),
        chain_len=_chain_lengths(plan, n_groups),
    )


def _file_vectors(cfg, plan, geo: _Geometry, number: int, start: int, stop: int):
    """(img, txt, topic, kind) of the rows [start, stop), file `number`."""
    frng = np.random.default_rng([cfg.seed, number, 1])
    kind = plan["kind"][start:stop]
    group = plan["group"][start:stop]
    member = plan["member"][start:stop]
    topic = plan["topic"][start:stop]
    m = stop - start
    noise = _noise(frng, m, cfg.dim)
    img = np.empty((m, cfg.dim), np.float32)
    single = kind == 0
    img[single] = geo.spread * geo.centers[topic[single]] + noise[single]
    dup = kind == 1
    img[dup] = geo.bases[group[dup]] + geo.dup_eps * noise[dup]
    chain = kind == 2
    # Members sit at angles centred on the base, so a chain stays inside its topic.
    chain_len = geo.chain_len[group[chain]]
    angle = ((member[chain] - (chain_len - 1) / 2) * geo.theta)[:, None]
    img[chain] = (
        np.cos(angle) * geo.bases[group[chain]]
        + np.sin(angle) * geo.turn[group[chain]]
        + 0.03 * noise[chain]
    )
    giant = kind == 3
    img[giant] = geo.bases[int(plan["n_groups"])] + geo.giant_eps * noise[giant]
    img = _unit(img)
    # Text: t = c*img + sqrt(1-c^2)*w with w a unit vector orthogonal to img, so clip score = c.
    c = np.clip(frng.normal(0.30, 0.07, m), 0.02, 0.7).astype(np.float32)[:, None]
    w = _noise(frng, m, cfg.dim)
    w = _unit(w - np.sum(w * img, axis=1, keepdims=True) * img)
    return img, c * img + np.sqrt(1 - c * c) * w, topic, kind


def generate(out: str | Path, cfg: SynthConfig) -> dict:
    """Write a synthetic clip-retrieval folder at `out`; returns a summary.

    condense synth --out data/synth --n 20000 --dim 64
    """
    out = Path(out)
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    plan = plan_rows(cfg, rng)
    n, n_groups = cfg.n, int(plan["n_groups"])
    geo = _geometry(cfg, rng, plan)
    keys = []
    file_rows = cfg.rows_per_file
    for number, start in enumerate(range(0, n, file_rows)):
        stop = min(n, start + file_rows)
        img, txt, topic, kind = _file_vectors(cfg, plan, geo, number, start, stop)
        np.save(out / "img_emb" / f"img_emb_{number}.npy", img.astype(cfg.dtype))
        np.save(out / "text_emb" / f"text_emb_{number}.npy", txt.astype(cfg.dtype))
        ids = [f"{i:09d}" for i in range(start, stop)]
        caps = [f"a photo of topic {t} ({KIND_NAMES[k]})" for t, k in zip(topic, kind, strict=True)]
        url = [f"https://images.invalid/{i}.jpg" for i in ids]
        pq.write_table(
            pa.table({"key": ids, CAPTION: caps, URL: url}),
            out / "metadata" / f"metadata_{number}.parquet",
            row_group_size=METADATA_ROW_GROUP,
        )
        keys += ids
    truth = pa.table(
        {
            SAMPLE_ID: keys,
            "topic": plan["topic"],
            GROUP_ID: plan["group"],
            "kind": KIND_NAMES[plan["kind"]].tolist(),
        }
    )
    pq.write_table(truth, out / "truth.parquet")
    summary = {
        "rows": n,
        "dim": cfg.dim,
        "seed": cfg.seed,
        "topics": int(plan["n_topics"]),
        "groups": n_groups,
        "files": -(-n // file_rows),
        "rows_by_kind": {
            str(name): int((plan["kind"] == i).sum()) for i, name in enumerate(KIND_NAMES)
        },
        # One row per duplicate group or chain survives an exact dedup, plus every singleton.
        "expected_dedup_kept": int((plan["kind"] == 0).sum())
        + n_groups
        + (1 if (plan["kind"] == 3).any() else 0),
    }
    (out / "synth.json").write_text(
        json.dumps({"config": cfg.model_dump(), **summary}, indent=2) + "\n"
    )
    return summary


def dedup_quality(truth: pa.Table, dedup: pa.Table) -> dict:
    """How well a dedup run removed the planted duplicates (joined on sample_id).

    Of a planted group of m rows, m - 1 should go. A removal counts as correct while its group
    still has more than one row; removing a singleton, or a group's last row, is a false one.
    precision = correct removals / removals; recall = correct removals / planted duplicates.
    """
    import pyarrow.compute as pc

    joined = truth.join(dedup.select([SAMPLE_ID, KEPT]), SAMPLE_ID, join_type="inner")
    group = joined.column(GROUP_ID).to_numpy()
    removed = ~joined.column(KEPT).to_numpy(zero_copy_only=False)
    solo = group < 0
    _, inverse, sizes = np.unique(group[~solo], return_inverse=True, return_counts=True)
    removed_in = np.bincount(inverse, weights=removed[~solo], minlength=len(sizes))
    correct = int(np.minimum(removed_in, sizes - 1).sum())
    planted = int((sizes - 1).sum())
    total_removed = int(removed.sum())
    return {
        "rows": len(joined),
        "planted_duplicates": planted,
        "removed": total_removed,
        "correct_removals": correct,
        "precision": correct / total_removed if total_removed else 1.0,
        "recall": correct / planted if planted else 1.0,
        "unmatched_rows": int(
            len(dedup) - pc.sum(pc.is_in(dedup.column(SAMPLE_ID), truth.column(SAMPLE_ID))).as_py()
        ),
    }
