"""input.kind urls: img2dataset downloads a url list from a real HTTP server on 127.0.0.1 (with
404s, garbage bytes and slow responses), then the pipeline embeds and exports the shards. The
download guard refuses what a web-scale url list must never reach: other schemes (file://
above all), addresses that are not public (also after a redirect), huge or endless bodies."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense.pipeline.runner import run_pipeline
from condense.readers.shards import drop_reason, read_samples
from tests.conftest import make_config, quiet_log
from tests.stages.test_embed_images import TINY, picture

HITS: list[str] = []


class Handler(BaseHTTPRequestHandler):
    elsewhere = ""  # a server on another loopback address, which the guard does not allow

    def do_GET(self):  # noqa: N802 (http.server's name)
        HITS.append(self.path)
        kind, name = self.path.strip("/").split("/")
        number = int(name.split(".")[0])
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"{Handler.elsewhere}/img/{number}.jpg")
            self.end_headers()
            return
        if kind == "slow":
            time.sleep(8)  # beyond the 3 s timeout below
        if kind == "trickle":  # a byte at a time within the socket timeout, for a minute
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
            return
        body = b"this is not an image" if kind == "garbage" else picture(number)
        if kind == "huge":
            body += bytes(3 << 20)
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
    servers = [ThreadingHTTPServer((host, 0), Handler) for host in ("127.0.0.1", "127.0.0.2")]
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Handler.elsewhere = f"http://127.0.0.2:{servers[1].server_address[1]}"
    yield f"http://127.0.0.1:{servers[0].server_address[1]}"
    for httpd in servers:
        httpd.shutdown()


def sample_id(i: int) -> str:
    return f"id-{i:03d}" if i % 2 else f"id.{i:03d}.v1"  # dots: never in a WebDataset key


REFUSED_KINDS = ["file", "ftp", "redirect", "huge", "trickle"]


def url_list(path, base, secret=None):
    kinds = ["img"] * 24 + ["missing"] * 3 + ["garbage"] * 2 + ["slow"] * 2 + REFUSED_KINDS
    other = {"file": f"file://{secret}", "ftp": f"ftp://127.0.0.1/{secret}"}
    rows = [
        (other.get(kind, f"{base}/{kind}/{i}.jpg"), f"a photo number {i}", sample_id(i))
        for i, kind in enumerate(kinds)
    ]
    urls, captions, ids = zip(*rows, strict=True)
    pq.write_table(pa.table({"url": urls, "caption": captions, "sample_id": ids}), path)
    return kinds


def urls_config(path):
    """Download every url of `url_list` into a run that keeps every sample through the funnel."""
    download = {
        "timeout": 3,
        "thread_count": 8,
        "number_sample_per_shard": 10,
        "allow_networks": ["127.0.0.1/32"],  # this server; 127.0.0.2 is not allowed
        "max_response_bytes": 1 << 20,
        "max_response_seconds": 4.0,  # over the 3 s timeout: the "slow" ones time out first
        "max_seconds": 50.0,  # the trickle would hold its thread for a minute without the cut-off
    }
    return make_config(
        path,
        input={"kind": "urls", "id_column": "sample_id", "download": download},
        embed={"model": {"name": TINY, "batch_size": 8}},
        cluster={"k": 2, "sample_size": 1000},
        dedup={"threshold": 0.9999},
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample={"n": 1000},
    )


def test_urls_download_embed_and_export(tmp_path, server):
    secret = tmp_path / "secret.jpg"  # a real image on this machine: it must never be copied
    secret.write_bytes(picture(999))
    kinds = url_list(tmp_path / "urls.parquet", server, secret)
    cfg = urls_config(tmp_path / "urls.parquet")
    run = tmp_path / "run"
    run_pipeline(cfg, run, log=quiet_log, progress=False)
    mark = json.loads((run / "embed" / "_stage.json").read_text())
    assert mark["rows_in"] == len(kinds) == 36
    assert mark["rows_out"] == 24
    assert mark["dropped"] == {"download_failed": 5, "download_refused": 5, "resize_failed": 2}
    for index in sorted((run / "input" / "download").glob("*.parquet")):
        for row in pq.read_table(index).to_pylist():
            if kinds[int(row["sample_id"][3:6])] in REFUSED_KINDS:
                assert "condense refused:" in row["error_message"], row
    shard_bytes = b"".join(p.read_bytes() for p in (run / "input" / "download").glob("*.tar"))
    assert secret.read_bytes() not in shard_bytes
    assert "/img/33.jpg" not in HITS  # the redirect's target on 127.0.0.2 was never reached
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
            exported += [s for s in read_samples(f) if drop_reason(s) is None]
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


def test_by_default_no_url_on_this_machine_is_fetched_and_the_download_has_a_time_bound(
    tmp_path, server
):
    """Loopback, private, link-local and metadata addresses are refused unless allowed; the
    img2dataset subprocess (and every process it started) stops at input.download.max_seconds."""
    from condense.errors import InputError
    from condense.readers import InputConfig
    from condense.readers.urls import run_download

    pq.write_table(
        pa.table(
            {
                "url": [f"{server}/img/1.jpg", "http://169.254.169.254/latest/meta-data/"],
                "caption": ["a", "b"],
            }
        ),
        tmp_path / "urls.parquet",
    )
    hits = len(HITS)
    cfg = InputConfig(kind="urls", path=str(tmp_path / "urls.parquet"))
    totals = run_download(cfg, str(tmp_path / "download"))
    assert totals["successes"] == 0 and totals["refused"] == 2 and len(HITS) == hits
    slow = cfg.model_copy(update={"download": cfg.download.model_copy(update={"max_seconds": 0.5})})
    with pytest.raises(InputError, match=r"ran longer than input.download.max_seconds \(0.5 s\)"):
        run_download(slow, str(tmp_path / "other" / "download"))
