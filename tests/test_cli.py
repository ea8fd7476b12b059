"""The `condense` command as people use it: exit codes, messages, the funnel."""

import json
import subprocess
import sys

import pytest
import yaml

from condense.cli import main
from tests.conftest import REPO


@pytest.mark.parametrize("command", ["synth", "run", "report", "demo"])
def test_every_command_has_help(command, venv_env):
    out = subprocess.run(
        [sys.executable, "-m", "condense.cli", command, "--help"],
        cwd=REPO,
        env=venv_env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "usage: condense" in out.stdout


def test_synth_run_report(ray_session, tmp_path, capsys):
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "in"),
                "--n",
                "1200",
                "--dim",
                "16",
                "--rows-per-file",
                "500",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "in" / "synth.json").read_text())["rows"] == 1200
    assert sorted(p.name for p in (tmp_path / "in" / "img_emb").iterdir()) == [
        "img_emb_0.npy",
        "img_emb_1.npy",
        "img_emb_2.npy",
    ]
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"path": str(tmp_path / "in")},
                "cluster": {"k": 4},
                "ray": {"progress": False},
            }
        )
    )
    capsys.readouterr()
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run_dir), "--set", "cluster.niter=5"]) == 0
    out = capsys.readouterr().out
    assert "embed" in out and "cluster" in out and "1,200" in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cluster"]["niter"] == 5
    assert main(["report", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["funnel"]
    assert [r["stage"] for r in rows] == [
        "embed",
        "cluster",
        "dedup",
        "clip_band",
        "centroid_band",
        "sample",
        "export",
    ]
    assert [(r["rows_in"], r["rows_out"]) for r in rows[:2]] == [(1200, 1200), (1200, 1200)]
    for before, after in zip(rows, rows[1:], strict=False):  # each stage takes the last's survivors
        assert after["rows_in"] == before["rows_out"]
    # The input was made by `condense synth`, so dedup is scored against the planted truth.
    quality = report["dedup_quality"]
    assert quality["rows"] == 1200 and quality["precision"] > 0.8 and quality["recall"] > 0.8
    assert main(["report", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "stage",
        "rows",
        "in",
        "rows",
        "out",
        "kept",
        "%",
        "dropped",
        "seconds",
        "rows/s",
        "read",
        "B/row",
        "written",
        "B/row",
    ]
    # Every stage moved bytes through the storage layer, and embed read both vectors per row.
    assert all(r["bytes_read"] > 0 and r["bytes_written"] > 0 for r in rows)
    assert rows[0]["vector_bytes_read"] >= 1200 * 2 * 2  # at least 2 bytes a float, 2 vectors


def test_errors_name_the_problem_and_exit_2(ray_session, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("input: {path: /nowhere}\ncluster: {kk: 3}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "cluster.kk: unknown key" in capsys.readouterr().err
    config.write_text("input: {path: /nowhere}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == "error: input folder /nowhere does not exist\n"  # no traceback
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no stage has started" in capsys.readouterr().err
    import ray

    assert ray.is_initialized()  # the CLI leaves a Ray it did not start alone
