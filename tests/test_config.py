import pytest

from condense.config import config_from_dict, load_config
from condense.errors import ConfigError
from condense.strict import parse_overrides
from tests.conftest import REPO


def test_recipe_config_holds_the_public_settings():
    cfg = load_config(REPO / "configs" / "laion2b.yaml")
    assert cfg.cluster.k == 100_000
    assert cfg.dedup.threshold == 0.86
    assert (cfg.clip_band.lo, cfg.clip_band.hi) == (0.40, 0.60)
    assert (cfg.centroid_band.lo, cfg.centroid_band.hi) == (0.15, 0.35)
    assert cfg.sample.n == 2_000_000
    assert cfg.embed.dim == 768


def test_demo_config_file_is_the_embedded_default():
    from condense.cli import synthetic_demo_config

    assert load_config(REPO / "configs" / "demo.yaml") == synthetic_demo_config()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\ncluster: {k: 4, kk: 5}\n")
    with pytest.raises(ConfigError, match=r"cluster\.kk: unknown key"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"clusterr: unknown key"):
        config_from_dict({"input": {"path": "x"}, "clusterr": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"cluster\.k: .*integer.*'many'"):
        config_from_dict({"input": {"path": "x"}, "cluster": {"k": "many"}})
    with pytest.raises(ConfigError, match=r"cluster\.spherical"):
        config_from_dict({"input": {"path": "x"}, "cluster": {"spherical": "yes"}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"dedup\.threshold"):
        config_from_dict({"input": {"path": "x"}, "dedup": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match=r"clip_band.*lo \(0.6\) must be smaller than hi \(0.4\)"):
        config_from_dict({"input": {"path": "x"}, "clip_band": {"lo": 0.6, "hi": 0.4}})
    with pytest.raises(ConfigError, match=r"input: .*input.path is required"):
        config_from_dict({"input": {"kind": "embeddings"}})
    with pytest.raises(ConfigError, match=r"input: Field required"):
        config_from_dict({})


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("dedup", {"threshold": 0.0}, r"dedup\.threshold"),
        ("dedup", {"threshold": -0.5}, r"dedup\.threshold"),
        ("dedup", {"threshold": 1.0001}, r"dedup\.threshold"),
        ("dedup", {"thresholds": [0.8, 1.2]}, r"dedup\.thresholds.*1\.2 is outside \(0, 1\]"),
        ("dedup", {"keep": "mid"}, r"dedup\.keep"),
        ("clip_band", {"lo": 0.5, "hi": 0.5}, r"clip_band.*must be smaller"),
        ("centroid_band", {"lo": -0.1, "hi": 0.3}, r"centroid_band\.lo"),
        ("centroid_band", {"lo": 0.1, "hi": 1.3}, r"centroid_band\.hi"),
        ("sample", {"n": -1}, r"sample\.n"),
        ("sample", {"n": 5, "fraction": 0.1}, r"exactly one of sample\.n and sample\.fraction"),
        ("sample", {"n": None, "fraction": 0.0}, r"sample\.fraction"),
    ],
)
def test_selection_settings_out_of_range_are_refused(section, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"input": {"path": "x"}, section: value})
    # The edges that are allowed: threshold 1.0, a band over everything, an empty sample.
    cfg = config_from_dict(
        {
            "input": {"path": "x"},
            "dedup": {"threshold": 1.0},
            "clip_band": {"lo": 0.0, "hi": 1.0},
            "sample": {"n": 0},
        }
    )
    assert cfg.dedup.threshold == 1.0 and cfg.sample.n == 0


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\n")
    cfg = load_config(
        path,
        [
            "cluster.k=12",
            "cluster.spherical=true",
            "dedup.thresholds=[0.8, 0.9]",
            "input.path=/data/emb",
        ],
    )
    assert cfg.cluster.k == 12 and cfg.cluster.spherical is True
    assert cfg.dedup.thresholds == [0.8, 0.9]
    assert cfg.input.path == "/data/emb"
    with pytest.raises(ConfigError, match=r"cluster\.nope: unknown key"):
        load_config(path, ["cluster.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["cluster.k"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_runtime_settings_do_not_change_the_fingerprint():
    from condense.pipeline.runner import stage_fingerprints

    base = config_from_dict({"input": {"path": "x"}})
    workers = config_from_dict(
        {"input": {"path": "x"}, "cluster": {"workers": 3}, "ray": {"num_cpus": 1}}
    )
    k = config_from_dict({"input": {"path": "x"}, "cluster": {"k": 7}})
    assert stage_fingerprints(base) == stage_fingerprints(workers)
    assert stage_fingerprints(base)["embed"] == stage_fingerprints(k)["embed"]
    assert stage_fingerprints(base)["cluster"] != stage_fingerprints(k)["cluster"]
