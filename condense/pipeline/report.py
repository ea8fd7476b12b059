"""The funnel of a run: per stage, rows in and out, kept %, drops, seconds and rows/s."""

from __future__ import annotations

from pathlib import Path

from condense.errors import CondenseError
from condense.pipeline.rundir import RunDir


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
            }
        )
    if not rows:
        raise CondenseError(
            f"{run.root}: no stage has started here (no */_stage.json or */_progress.json)"
        )
    return rows


def format_funnel(rows: list[dict]) -> str:
    """A plain-text table of `funnel` rows."""
    header = ("stage", "rows in", "rows out", "kept %", "dropped", "seconds", "rows/s")
    lines = [header]
    for r in rows:
        if r["status"] != "complete":
            lines.append((r["stage"], "-", "-", "-", r["status"], "-", "-"))
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
