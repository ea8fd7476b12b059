"""docs/scale.md's capacity plan is the output of bench/capacity.py on the figures the scale
benchmark measured (bench/scale-figures.json): the document cannot drift from its script."""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import REPO


def load_capacity():
    spec = importlib.util.spec_from_file_location("capacity", REPO / "bench" / "capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_docs_scale_holds_the_scripts_tables():
    capacity = load_capacity()
    doc = (REPO / "docs" / "scale.md").read_text()
    for table in capacity.report(capacity.measured()).split("\n\n"):
        assert table in doc


def test_the_plan_reads_its_bytes_from_the_counters():
    capacity = load_capacity()
    m = capacity.measured()
    # The scale run's vectors: embed reads image and text, the assignment reads the image and
    # scatters it, dedup reads the scatter.
    assert abs(m.units["embed"] - 2) < 0.01 and abs(m.units["dedup"] - 1) < 0.01
    assert abs(m.units["cluster"] - m.sample_units - 2) < 0.05  # and centroids.npy
    embed = next(s for s in capacity.stages(m) if s.name.startswith("embed"))
    assert embed.bytes >= capacity.ROWS * 2 * capacity.UNIT


def test_more_nodes_never_take_longer_and_training_divides_by_the_gpus():
    capacity = load_capacity()
    m = capacity.measured()
    for node in capacity.NODE_TYPES:
        for stage in capacity.stages(m):
            if stage.driver:  # the partials into the driver grow with the GPUs (see below)
                continue
            hours = [stage.seconds(node, n, 5e9)[0] for n in (1, 8, 32)]
            assert hours == sorted(hours, reverse=True), stage.name
            assert stage.seconds(node, 8, 5e9)[1] in ("CPU", "GPU", "store I/O", "driver network")
    train = next(s for s in capacity.stages(m) if s.name.startswith("cluster: train"))
    h100 = capacity.NODE_TYPES[1]
    gpu = train.fp16 / (h100.fp16 * 8 * capacity.EFFICIENCY)
    assert abs(train.seconds(h100, 1, 5e9)[0] - max(gpu, train.driver * 8 / h100.network)) < 1
