"""Two simulated nodes: the cluster stage spreads over both and gives the single-node output."""

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from condense.config import config_from_dict
from condense.pipeline.runner import run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import REPO


def table(run_dir):
    files = sorted((run_dir / "cluster").glob("part-*.parquet"))
    return pq.read_table(files).to_pandas().sort_values("sample_id").reset_index(drop=True)


@pytest.mark.slow
def test_cluster_stage_spreads_over_two_nodes(ray_session, tmp_path, venv_env):
    generate(tmp_path / "in", SynthConfig(n=2000, dim=32, seed=4, rows_per_file=1000))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "stages" / "multinode_run.py"),
            str(tmp_path / "in"),
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env={**venv_env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    mark = json.loads((tmp_path / "two" / "cluster" / "_stage.json").read_text())
    assert len(mark["nodes"]) == 2, mark["nodes"]  # assignment actors ran on both nodes

    cfg = config_from_dict(
        {
            "input": {"kind": "embeddings", "path": str(tmp_path / "in")},
            "embed": {"rows_per_part": 250},
            "cluster": {"k": 6, "sample_size": 1000},
            "ray": {"progress": False},
        }
    )
    run_pipeline(cfg, tmp_path / "one", log=lambda _: None, progress=False)
    pd.testing.assert_frame_equal(
        table(tmp_path / "two"), table(tmp_path / "one"), check_exact=True
    )
