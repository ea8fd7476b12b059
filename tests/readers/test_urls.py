"""input.kind urls: img2dataset downloads a url list from a real HTTP server on 127.0.0.1 (with
404s, garbage bytes and slow responses), then the pipeline embeds and exports the shards."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense.pipeline.runner import run_pipeline
from condense.readers.shards import read_samples, usable
from tests.conftest import make_config, quiet_log
from tests.stages.test_embed_images import TINY, picture

HITS: list[str] = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        HITS.append(self.path)
        kind, name = self.path.strip("/").split("/")
        number = int(name.split(".")[0])
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "slow":
            time.sleep(8)  # beyond the 3 s timeout below
        body = b"this is not an image" if kind == "garbage" else picture(number)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow ones)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def sample_id(i: int) -> str:
    return f"id-{i:03d}" if i % 2 else f"id.{i:03d}.v1"  # dots: never in a WebDataset key


def url_list(path, base):
    kinds = ["img"] * 24 + ["missing"] * 3 + ["garbage"] * 2 + ["slow"] * 2
    rows = [
        (f"{base}/{kind}/{i}.jpg", f"a photo number {i}", sample_id(i))
        for i, kind in enumerate(kinds)
    ]
    urls, captions, ids = zip(*rows, strict=True)
    pq.write_table(pa.table({"url": urls, "caption": captions, "sample_id": ids}), path)
    return kinds


def test_urls_download_embed_and_export(ray_session, tmp_path, server):
    kinds = url_list(tmp_path / "urls.parquet", server)
    cfg = make_config(
        tmp_path / "urls.parquet",
        input={
            "kind": "urls",
            "id_column": "sample_id",
            "download": {"timeout": 3, "thread_count": 8, "number_sample_per_shard": 10},
        },
        embed={"model": {"name": TINY, "batch_size": 8}},
        cluster={"k": 2, "sample_size": 1000},
        dedup={"threshold": 0.9999},
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample={"n": 1000},
    )
    run = tmp_path / "run"
    run_pipeline(cfg, run, log=quiet_log, progress=False)
    mark = json.loads((run / "embed" / "_stage.json").read_text())
    assert mark["rows_in"] == len(kinds) == 31
    assert mark["rows_out"] == 24
    assert mark["dropped"] == {"download_failed": 5, "resize_failed": 2}
    assert sorted((run / "input" / "download").glob("*.tar"))  # img2dataset's own shards
    embed = pq.read_table(run / "embed", columns=["sample_id", "url", "caption"]).to_pandas()
    # The ids come from the url list (img2dataset saved the column), urls and captions too.
    assert sorted(embed.sample_id) == sorted(sample_id(i) for i in range(24))
    row = embed.set_index("sample_id").loc["id-007"]
    assert row.url == f"{server}/img/7.jpg" and row.caption == "a photo number 7"
    # Export copies the downloaded samples into the coreset shards.
    index = pq.read_table(sorted((run / "export" / "shards").glob("*.parquet"))).to_pandas()
    assert sorted(index.sample_id) == sorted(embed.sample_id)
    # Every exported sample reads back whole, ids with dots included (their keys lost them).
    exported = []
    for shard in sorted((run / "export" / "shards").glob("*.tar")):
        with open(shard, "rb") as f:
            exported += [s for s in read_samples(f) if usable(s) is None]
    assert sorted(s.key for s in exported) == sorted(index.key) and len(exported) == 24

    # A rerun with another batch size embeds again but downloads nothing.
    hits = len(HITS)
    cfg2 = make_config(
        tmp_path / "urls.parquet",
        **{
            k: v
            for k, v in cfg.model_dump().items()
            if k in ("input", "cluster", "dedup", "clip_band", "centroid_band", "sample")
        },
        embed={"model": {"name": TINY, "batch_size": 3}},
    )
    run_pipeline(cfg2, run, log=quiet_log, progress=False)
    assert len(HITS) == hits
    assert json.loads((run / "embed" / "_stage.json").read_text())["rows_out"] == 24
