"""The funnel of a run: per stage, rows in and out, kept %, drops, seconds and rows/s."""

from __future__ import annotations

from pathlib import Path

from condense.errors import CondenseError
from condense.schema import GROUP_ID, KEPT, SAMPLE_ID, SOURCE
from condense.storage.fs import location
from condense.storage.parts import read_table
from condense.storage.rundir import CONFIG, RunDir


def funnel(run_dir: str | Path) -> list[dict]:
    """One row per stage that has started, in pipeline order."""
    from condense.pipeline.runner import STAGE_NAMES

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise CondenseError(f"{run.root} is not a run directory")
    rows = []
    for name in STAGE_NAMES:
        mark = run.stage_mark(name)
        if mark is None:
            if run.progress_mark(name) is not None:
                rows.append({"stage": name, "status": "incomplete"})
            continue
        rows_in, rows_out = mark["rows_in"], mark["rows_out"]
        rows.append(
            {
                "stage": name,
                "status": mark.get("status", "complete"),
                "rows_in": rows_in,
                "rows_out": rows_out,
                "kept_pct": round(100.0 * rows_out / rows_in, 2) if rows_in else None,
                "dropped": mark.get("dropped", {}),
                "seconds": mark.get("seconds"),
                "rows_per_second": mark.get("rows_per_second"),
                **{key: mark.get(key) for key in BYTE_FIELDS},
            }
        )
    if not rows:
        raise CondenseError(
            f"{run.root}: no stage has started here (no */_stage.json or */_progress.json)"
        )
    return rows


BYTE_FIELDS = ("bytes_read", "bytes_written", "vector_bytes_read", "vector_bytes_written")


def _per_row(r: dict, key: str) -> str:
    """A stage's bytes per row entering it (runs made before the meter have none)."""
    if r.get(key) is None or not r["rows_in"]:
        return "-"
    return f"{r[key] / r['rows_in']:,.0f}"


def format_funnel(rows: list[dict]) -> str:
    """A plain-text table of `funnel` rows."""
    header = (
        "stage",
        "rows in",
        "rows out",
        "kept %",
        "dropped",
        "seconds",
        "rows/s",
        "read B/row",
        "written B/row",
    )
    lines = [header]
    for r in rows:
        if r["status"] != "complete":
            lines.append((r["stage"], "-", "-", "-", r["status"], "-", "-", "-", "-"))
            continue
        dropped = ", ".join(f"{k}={v:,}" for k, v in r["dropped"].items()) or "-"
        lines.append(
            (
                r["stage"],
                f"{r['rows_in']:,}",
                f"{r['rows_out']:,}",
                "-" if r["kept_pct"] is None else f"{r['kept_pct']:.2f}",
                dropped,
                f"{r['seconds']:.1f}",
                f"{r['rows_per_second']:,.0f}" if r["rows_per_second"] else "-",
                _per_row(r, "bytes_read"),
                _per_row(r, "bytes_written"),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        cells = [
            str(c).ljust(w) if i in (0, 4) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def planted_truth(run_dir: str | Path) -> Path | None:
    """The ground truth of a run on `condense synth` data (RUN/input/truth.parquet, or beside
    the configured input), when there is one."""
    import yaml

    run = RunDir(run_dir)
    candidates = [run.root / "input" / "truth.parquet"]
    config = run.root / "config.yaml"
    if config.exists():
        path = (yaml.safe_load(config.read_text()) or {}).get("input", {}).get("path")
        if path:
            candidates.append(location(path) / "truth.parquet")
    return next((c for c in candidates if c.exists()), None)


def dedup_quality(run_dir: str | Path) -> dict | None:
    """Precision and recall of dedup against the planted truth (None without truth or dedup)."""

    from condense.storage.parts import part_files
    from condense.synth import dedup_quality as measure

    run = RunDir(run_dir)
    truth = planted_truth(run_dir)
    parts = part_files(run.stage_dir("dedup"))
    if truth is None or run.stage_mark("dedup") is None or not parts:
        return None
    dedup = read_table(run.stage_dir("dedup"), columns=[SAMPLE_ID, KEPT])
    return measure(read_table(truth, columns=[SAMPLE_ID, GROUP_ID]), dedup)


def format_quality(q: dict) -> str:
    return (
        f"dedup against the planted truth: precision {q['precision']:.3f}, recall "
        f"{q['recall']:.3f} ({q['correct_removals']:,} of {q['removed']:,} removals correct; "
        f"{q['planted_duplicates']:,} planted duplicates)"
    )


def sample_images(run_dir: str | Path, sample_ids: list[str]) -> dict[str, bytes]:
    """Image bytes of the given samples of an image run, read from their source shards
    (embed/ says which shard holds each); {} for runs on precomputed embeddings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from condense.config import load_config
    from condense.readers import IMAGE_KINDS
    from condense.readers.shards import IMAGE_EXTENSIONS
    from condense.readers.webdataset import find_samples, list_shards
    from condense.stages.embed import image_root

    run = RunDir(run_dir)
    config = load_config(run.root / CONFIG)
    if config.input.kind not in IMAGE_KINDS or not sample_ids:
        return {}
    rows = read_table(run.stage_dir("embed"), columns=[SAMPLE_ID, SOURCE])
    rows = rows.filter(pc.is_in(rows.column(SAMPLE_ID), pa.array(sample_ids, pa.string())))
    wanted: dict[str, set[str]] = {}
    for sample_id, source in zip(
        rows.column(SAMPLE_ID).to_pylist(), rows.column(SOURCE).to_pylist(), strict=True
    ):
        wanted.setdefault(source, set()).add(sample_id)
    try:
        paths = {s.source: s.path for s in list_shards(image_root(config, run.root))}
    except CondenseError:  # the source shards are gone: nothing to show
        return {}
    found: dict[str, bytes] = {}
    for source, ids in wanted.items():
        if source not in paths:
            continue
        found_here = find_samples(paths[source], ids, config.input.id_column, config.input.limits)
        for sample_id, members in found_here:
            image = next((data for ext, data in members if ext in IMAGE_EXTENSIONS), None)
            if image:
                found[sample_id] = image
    return found
