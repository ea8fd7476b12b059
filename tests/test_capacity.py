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
    measured = capacity.measured_costs(capacity.scale_figures())
    doc = (REPO / "docs" / "scale.md").read_text()
    assert capacity.inputs_table(measured) in doc
    assert capacity.table(measured) in doc


def test_more_nodes_never_take_longer_and_the_bound_is_named():
    capacity = load_capacity()
    measured = capacity.measured_costs({"rows": 10_000_000, "dedup_seconds": 300.0})
    for stage in capacity.stages(measured):
        hours = [stage.seconds(n)[0] for n in (1, 8, 32)]
        assert hours == sorted(hours, reverse=True), stage.name
        assert stage.seconds(8)[1] in ("CPU", "GPU", "store I/O")
    # One trainer GPU: k-means training takes as long on 32 nodes as on one.
    train = next(s for s in capacity.stages(measured) if s.name == "cluster: train")
    assert train.seconds(1)[0] == train.seconds(32)[0] > 0
