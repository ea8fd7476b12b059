"""End to end on `condense synth` data: dedup removes the planted duplicates, and the funnel has
the recipe's shape (about half kept by dedup at 0.86, then 20% and 20%, then the sample)."""

from decimal import Decimal

from condense.pipeline.report import dedup_quality, format_quality, funnel
from condense.pipeline.runner import run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import make_config, quiet_log


def test_synth_funnel_looks_like_the_recipe(tmp_path):
    generate(tmp_path / "in", SynthConfig(n=8000, dim=64, seed=3, rows_per_file=2000))
    cfg = make_config(
        tmp_path / "in",
        cluster={"k": 16, "niter": 20},
        dedup={"thresholds": [0.8, 0.9]},
        sample={"n": 100, "seed": 0},
    )
    run_pipeline(cfg, tmp_path / "run", log=quiet_log, progress=False)
    rows = {r["stage"]: r for r in funnel(tmp_path / "run")}
    quality = dedup_quality(tmp_path / "run")
    print("\n" + format_quality(quality))
    # Exact per cluster: nothing unplanted is removed; a planted group split by k-means
    # across two clusters keeps a row in each, the only source of missed duplicates.
    assert quality["precision"] > 0.99 and quality["recall"] > 0.95
    assert 0.40 < rows["dedup"]["kept_pct"] / 100 < 0.60
    for stage, (lo, hi) in {"clip_band": ("0.4", "0.6"), "centroid_band": ("0.15", "0.35")}.items():
        n = rows[stage]["rows_in"]
        assert rows[stage]["rows_out"] == int(Decimal(hi) * n) - int(Decimal(lo) * n)
    assert rows["clip_band"]["rows_in"] == rows["dedup"]["rows_out"]
    assert rows["centroid_band"]["rows_in"] == rows["clip_band"]["rows_out"]
    assert rows["sample"]["rows_in"] == rows["centroid_band"]["rows_out"]
    assert rows["sample"]["rows_out"] == 100
