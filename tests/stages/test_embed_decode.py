"""The embed actor's two image paths and its caption batches, in one process: JPEGs decoded and
preprocessed by torchvision on the encoder's device (here the CPU: the code nvJPEG runs on a
GPU) against Pillow's, images the device cannot take handed to Pillow, and captions encoded in
length order with each batch cut to its longest caption."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

TINY = str(REPO / "configs" / "models" / "tiny-clip.json")


def jpeg(image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def paths(model: str):
    from condense.readers.shards import ShardLimits
    from condense.stages.embed.clip import image_transform, preprocess_config
    from condense.stages.embed.pixels import DevicePixels

    cfg = preprocess_config(model)
    transform = image_transform(cfg)
    return transform, DevicePixels(cfg, "cpu", transform, ShardLimits())


@pytest.fixture(scope="module")
def thumbnail(tmp_path_factory):
    """The demo's hand-built CLIP, whose image embedding is the photo's colour thumbnail."""
    from condense.demo import MODEL_CONFIG
    from condense.demo.thumbnail import write_checkpoint
    from condense.stages.embed.clip import ClipEncoder

    checkpoint = tmp_path_factory.mktemp("thumbnail") / "thumbnail-clip.pt"
    write_checkpoint(MODEL_CONFIG, checkpoint)
    return str(MODEL_CONFIG), ClipEncoder(str(MODEL_CONFIG), checkpoint=str(checkpoint))


def test_device_decode_gives_pillows_embeddings_on_the_demo_photos(thumbnail):
    """Every demo photo as a JPEG at its own size: torchvision's decode and resize give pixels
    within one grey level of Pillow's, and the demo model's embeddings agree to a cosine of
    0.99 at worst (0.9925 measured; 0.9994 on average)."""
    import torch

    from condense.cores.images import decode_rgb
    from condense.demo.corpus import photos

    model, encoder = thumbnail
    transform, device = paths(model)
    data = [jpeg(image) for _name, image in photos()]
    assert len(data) >= 20
    pil = torch.stack([transform(decode_rgb(d)[0]) for d in data])
    pixels, keep, dropped = device(data)
    assert keep.tolist() == list(range(len(data))) and dropped == {}
    assert pixels.shape == pil.shape
    assert not torch.equal(pixels, pil)  # torchvision decoded and resized them, not Pillow
    from condense.stages.embed.clip import preprocess_config

    std = min(preprocess_config(model)["std"])
    assert float((pixels - pil).abs().max()) <= 1.01 / 255 / std  # one grey level
    cos = (encoder.encode_images(pil) * encoder.encode_images(pixels)).sum(axis=1)
    assert cos.min() > 0.99 and cos.mean() > 0.999


def test_what_the_device_cannot_decode_goes_to_pillow_and_bad_bytes_are_dropped():
    """PNG, CMYK and EXIF-turned JPEGs are Pillow's (the same pixels as its path, bit for bit);
    a JPEG whose header reads but whose data is garbage is refused by both decoders and
    dropped as Pillow names it."""
    import torch

    from condense.cores.images import PLAIN_JPEG, decode_or_plain_jpeg, decode_rgb

    transform, device = paths(TINY)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    png = io.BytesIO()
    rgb.save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees
    turned = jpeg(rgb, exif=exif)
    cmyk = jpeg(rgb.convert("CMYK"))
    plain = jpeg(rgb)
    garbage = plain[:200] + bytes(rng.integers(0, 255, 4000, dtype=np.uint8)) + b"\xff\xd9"
    assert decode_or_plain_jpeg(plain) == (PLAIN_JPEG, None)
    assert decode_or_plain_jpeg(jpeg(rgb.convert("L"))) == (PLAIN_JPEG, None)
    for data in (png.getvalue(), turned, cmyk):
        image, reason = decode_or_plain_jpeg(data)
        assert reason is None and image is not PLAIN_JPEG  # decoded here, by Pillow
    rows = [transform(decode_or_plain_jpeg(d)[0]) for d in (png.getvalue(), turned, cmyk)]
    pixels, keep, dropped = device([rows[0], garbage, rows[1], plain, rows[2]])
    assert decode_rgb(garbage)[1] == "corrupt_image"
    assert keep.tolist() == [0, 2, 3, 4] and dropped == {"corrupt_image": 1}
    for got, want in zip(pixels[[0, 1, 3]], rows, strict=True):
        assert torch.equal(got, want)


def test_captions_in_length_order_with_each_batch_cut_give_the_full_context_embeddings():
    import torch

    from condense.stages.embed.clip import ClipEncoder

    encoder = ClipEncoder(TINY, batch_size=3)
    assert encoder.trim  # the tiny model's text tower is open_clip's causal one
    rng = np.random.default_rng(1)
    words = ("photo", "of", "a", "red", "house", "by", "the", "lake")
    captions = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(10)] + [""]
    # Token 0 is padding but also a real token ("!" before another piece): these captions
    # hold zeros before their end, and must not be cut there.
    captions += ['wow!" he said!"!"!"!"', '!!"!"', 'a "quote!"!" in the middle']
    got = encoder.encode_texts(captions)
    with torch.inference_mode():
        full = encoder.model.encode_text(encoder.tokenizer(captions), normalize=True).numpy()
    assert np.allclose(got, full, atol=2e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_read_ahead_keeps_the_order_raises_where_the_reader_failed_and_stops_with_the_reader():
    """The GPU actor's read-ahead thread: batches in order, a reader's error raised at its
    batch, and a consumer that stops early stops the thread."""
    import threading

    from condense.stages.embed.pixels import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for batch in read_ahead(failing(), depth=2):
            got.append(batch)
    assert got == [0, 1, 2]
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    stream = read_ahead(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the consumer stops: the thread ends, having read at most depth + 2 more
    assert not any(t.name == "condense-read-ahead" for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 2
