"""The image demo end to end, and the hand-set thumbnail ViT it embeds with."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from condense.demo import MODEL_CONFIG
from condense.demo.corpus import photos
from condense.demo.thumbnail import GRID, write_checkpoint
from condense.pipeline.report import dedup_quality
from condense.stages.embed.clip import ClipEncoder


@pytest.fixture(scope="module")
def thumbnail(tmp_path_factory):
    path = write_checkpoint(MODEL_CONFIG, tmp_path_factory.mktemp("thumb") / "model.pt")
    return ClipEncoder(str(MODEL_CONFIG), checkpoint=str(path))


def reference(encoder, image):
    """The embedding the weights are meant to compute, in numpy: the preprocessed image's
    8 x 8 mean colours, mirror columns summed, each colour's mean removed, unit length."""
    pixels = encoder.pixels([image])[0].numpy().transpose(1, 2, 0)
    size = pixels.shape[0] // GRID
    cells = pixels.reshape(GRID, size, GRID, size, 3).mean(axis=(1, 3))
    sym = cells[:, : GRID // 2] + cells[:, ::-1][:, : GRID // 2]
    sym = sym - sym.mean(axis=(0, 1), keepdims=True)
    return sym.ravel() / np.linalg.norm(sym)


def test_thumbnail_vit_computes_the_thumbnail(thumbnail):
    images = [image.resize((160, 120)) for _, image in photos()]
    got = thumbnail.encode_images(thumbnail.pixels(images))
    want = np.stack([reference(thumbnail, image) for image in images])
    agreement = (got * want).sum(axis=1)
    assert np.median(agreement) > 0.9999 and (agreement > 0.99).mean() > 0.9
    # Flip-invariant by construction (on square images, where the centre crop is symmetric;
    # a chessboard's mirror image swaps its colours, so it is no test); distinct photos differ.
    square = [i.resize((128, 128)) for n, i in photos() if not n.startswith("chessboard")]
    plain = thumbnail.encode_images(thumbnail.pixels(square))
    flipped = thumbnail.encode_images(thumbnail.pixels([ImageOps.mirror(i) for i in square]))
    assert ((plain * flipped).sum(axis=1) > 0.999).all()
    sims = got @ got.T
    off = sims[~np.eye(len(images), dtype=bool)]
    assert np.median(off) < 0.3


def test_demo_end_to_end(demo_run):
    run = demo_run
    embed = json.loads((run / "embed" / "_stage.json").read_text())
    assert embed["dropped"] == {"download_failed": 3, "resize_failed": 2}
    assert embed["rows_out"] > 250
    quality = dedup_quality(run)
    assert quality["precision"] >= 0.85 and quality["recall"] >= 0.9
    # A re-compressed copy always lands in its original's component.
    dedup = pq.read_table(run / "dedup", columns=["sample_id", "component_id"]).to_pandas()
    component = dict(zip(dedup.sample_id, dedup.component_id, strict=True))
    copies = [s for s in component if s.endswith("-recompressed")]
    assert copies and all(
        component[c] == component[c.removesuffix("-recompressed")] for c in copies
    )
    sample = json.loads((run / "sample" / "_stage.json").read_text())
    assert sample["rows_out"] == 4
    shards = sorted((run / "export" / "shards").glob("*.tar"))
    assert len(shards) == 2
    entries = json.loads((run / "export" / "coreset.json").read_text())
    assert len(entries) == 4
    import webdataset as wds

    decoded = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil"))
    assert len(decoded) == 4 and all(isinstance(d["jpg"], Image.Image) for d in decoded)


def test_demo_rerun_skips_every_stage(demo_run):
    """The corpus, its urls (the same port) and the settings are unchanged: nothing reruns,
    nothing downloads again."""
    from condense.demo import PORT, run_demo

    urls = pq.read_table(demo_run / "input" / "urls.parquet").column("url").to_pylist()
    if not urls[0].startswith(f"http://127.0.0.1:{PORT}/"):
        pytest.skip(f"port {PORT} was taken: the first run's urls named another port")
    log: list[str] = []
    run_demo(demo_run, log=log.append, progress=False)
    skipped = [line for line in log if "complete with these settings: skipped" in line]
    assert len(skipped) == 7, log
