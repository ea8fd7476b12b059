"""Stage export for embedding-only inputs: the coreset's url + caption table and key lists."""

import pyarrow.parquet as pq

from condense.pipeline.runner import run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import make_config, quiet_log


def test_export_lists_exactly_the_coreset(tmp_path):
    generate(tmp_path / "in", SynthConfig(n=3000, dim=32, seed=4, rows_per_file=1000))
    cfg = make_config(tmp_path / "in", cluster={"k": 6}, sample={"n": 40, "seed": 1})
    run = tmp_path / "run"
    run_pipeline(cfg, run, log=quiet_log, progress=False)
    sample = pq.read_table(run / "sample", columns=["sample_id", "kept"]).to_pandas()
    coreset = set(sample.sample_id[sample.kept])
    assert len(coreset) == 40
    exported = pq.read_table(sorted((run / "export").glob("part-*.parquet"))).to_pandas()
    assert list(exported.columns) == ["sample_id", "url", "caption", "source"]
    assert set(exported.sample_id) == coreset and len(exported) == 40
    # Joined by sample_id: each url and caption is the one embed/ holds for that id.
    embed = pq.read_table(run / "embed", columns=["sample_id", "url", "caption", "source"])
    embed = embed.to_pandas().set_index("sample_id").loc[sorted(coreset)]
    mine = exported.set_index("sample_id").loc[sorted(coreset)]
    assert (mine.url == embed.url).all() and (mine.caption == embed.caption).all()
    # One key file per input file, sorted, together the coreset.
    lists = {p.name: p.read_text().split() for p in (run / "export" / "keys").glob("*.txt")}
    assert set(lists) == {f"metadata_{i}.txt" for i in exported.source.str.extract(r"_(\d+)")[0]}
    assert all(keys == sorted(keys) for keys in lists.values())
    assert sorted(k for keys in lists.values() for k in keys) == sorted(coreset)
    for name, keys in lists.items():
        assert set(keys) == set(
            exported.sample_id[exported.source.str.endswith(name.replace(".txt", ".parquet"))]
        )
