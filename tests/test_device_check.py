"""bench/device_check.py, the one prepared GPU check, runs at tiny sizes on the CPU in every
`make test`, so the script is ready (and right) whenever a GPU machine is at hand."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_device_check_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "bench/device_check.py", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"encoder", "embed_path", "dedup", "assign", "training"}
    assert result["encoder"]["images_per_s"] > 0 and result["encoder"]["gflop_per_image"] > 0
    path = result["embed_path"]
    assert path["images"] == 16 and path["images_per_s"] > 0
    assert path["cosine_vs_pillow_min"] > 0.99  # the device decode agrees with Pillow
    dedup = result["dedup"]
    assert {(d["kind"], d["precision"]) for d in dedup} == {
        (kind, precision)
        for kind in ("typical", "singletons", "duplicate")
        for precision in ("fp32", "bf16")
    }
    assert all(d["same_as_fp32_cpu"] for d in dedup)  # decisions identical at every precision
    assign = result["assign"]
    assert all(assign[s]["rows_per_s"] > 0 for s in ("fp32", "fp16", "bf16"))
    assert assign["same_at_every_screen"] and assign["same_as_cpu"]
    assert assign["clusters_used"] > 1
    assert [t["stage"] for t in result["training"]] == ["stage1", "stage2"]
    assert all(t["tokens_per_s"] > 0 for t in result["training"])
    assert "| dedup typical 300 rows bf16 |" in done.stdout  # the table
