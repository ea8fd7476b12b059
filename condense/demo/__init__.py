"""`condense demo`: the whole pipeline on real photos, from urls to coreset shards, in a minute.

1. build a corpus from photos shipped inside scikit-image and scikit-learn, with planted
   near-duplicates and a few broken links (`corpus.py`), into RUN/input/;
2. serve it over HTTP on 127.0.0.1 for the length of the run;
3. run the pipeline on the url list (input.kind urls): img2dataset downloads it, the embed stage
   encodes it with an open_clip ViT whose weights are set by hand to a perceptual thumbnail
   (`thumbnail.py`: no CLIP weights can be downloaded here), then cluster, dedup at the
   recipe's 0.86, the two bands, the sample and the export to WebDataset shards;
4. print the funnel, dedup's precision and recall against the planted truth, and where the
   shards and the notebook are.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL_CONFIG = Path(__file__).with_name("thumbnail-clip.json")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


PORT = 8765  # the demo's preferred port: the same urls on every run, so a rerun skips stages


@contextlib.contextmanager
def serve(folder: Path, port: int = PORT) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 (`port`, or any free one when it is taken);
    yields the base url."""
    handler = partial(QuietHandler, directory=str(folder))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def image_demo_config(run_dir: Path, checkpoint: Path, overrides: dict | None = None):
    """The demo's pipeline config: the recipe's rules on a corpus of a few hundred photos."""
    from condense.config import config_from_dict
    from condense.strict import merge

    data = {
        "input": {
            "kind": "urls",
            "path": str(run_dir / "input" / "urls.parquet"),
            "id_column": "sample_id",
            "download": {
                "thread_count": 16,
                "number_sample_per_shard": 100,
                "timeout": 5,
                "allow_networks": ["127.0.0.1/32"],  # the demo's own photo server
            },
        },
        "embed": {
            "model": {
                "name": str(MODEL_CONFIG),
                "checkpoint": str(checkpoint),
                "batch_size": 64,
            },
        },
        "cluster": {"k": 8, "niter": 20, "sample_size": 10_000, "seed": 0},
        "sample": {"n": 4, "seed": 0},
        "export": {"shard_size": 2},
    }
    return config_from_dict(merge(data, overrides or {}), "demo")


def run_demo(
    run_dir: str | Path, log=print, progress: bool = True, overrides: dict | None = None
) -> Path:
    """Build, serve and condense the demo corpus into `run_dir`; returns the run directory."""
    from condense.demo.corpus import build_corpus
    from condense.demo.thumbnail import write_checkpoint
    from condense.pipeline.runner import run_pipeline
    from condense.storage.rundir import claim

    run_dir = claim(run_dir)  # before the corpus is written into it
    folder = run_dir / "input"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "thumbnail-clip.pt"
    if not checkpoint.exists():
        write_checkpoint(MODEL_CONFIG, checkpoint)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with serve(folder / "images") as base:  # the photos only, not the rest of RUN/input
        counts = build_corpus(folder, base_url=base)
        log(
            f"[demo] corpus: {counts['rows']} urls of photos from scikit-image and scikit-learn "
            f"({counts['distinct']} distinct images, {counts['planted_duplicates']} planted "
            f"near-duplicates, {counts['broken']} broken links), served at {base}"
        )
        run_pipeline(
            image_demo_config(run_dir, checkpoint, overrides), run_dir, log=log, progress=progress
        )
    return run_dir
