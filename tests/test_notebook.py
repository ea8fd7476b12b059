"""notebooks/inspect_run.ipynb runs from top to bottom on a small run."""

import os

import nbformat
from nbclient import NotebookClient

from condense.pipeline.runner import run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import REPO, make_config, quiet_log


def execute(run_dir, monkeypatch) -> list:
    """Run the notebook on `run_dir`; return its outputs."""
    monkeypatch.setenv("CONDENSE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(REPO / "notebooks" / "inspect_run.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_notebook_on_an_embeddings_run(tmp_path, monkeypatch):
    generate(tmp_path / "in", SynthConfig(n=2000, dim=32, seed=1, rows_per_file=1000))
    cfg = make_config(tmp_path / "in", cluster={"k": 4}, sample={"n": 30})
    run_pipeline(cfg, tmp_path / "run", log=quiet_log, progress=False)
    outputs = execute(tmp_path / "run", monkeypatch)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # funnel, score histograms, cluster sizes
    text = "".join(o.get("text", "") for o in outputs)
    assert "dedup against the planted truth" in text and "key lists" in text


def test_notebook_on_the_image_demo(demo_run, monkeypatch):
    outputs = execute(demo_run, monkeypatch)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # funnel, histograms, cluster sizes, component gallery, export page
    text = "".join(o.get("text", "") for o in outputs)
    assert "dedup against the planted truth" in text and "2 shards in" in text
