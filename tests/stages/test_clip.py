"""The CLIP encoder on the tiny random-weight config: shapes, unit rows, batch independence."""

import numpy as np
import pytest
from PIL import Image

from condense.stages.embed.clip import ClipEncoder
from tests.conftest import REPO

TINY = str(REPO / "configs" / "models" / "tiny-clip.json")


@pytest.fixture(scope="module")
def encoder():
    import torch

    torch.manual_seed(0)
    return ClipEncoder(TINY)


def test_embeddings_are_unit_rows_and_batch_independent(encoder):
    images = [Image.new("RGB", (40 + 10 * i, 30), (i * 40, 100, 200 - i * 30)) for i in range(5)]
    pixels = encoder.pixels(images)
    assert tuple(pixels.shape) == (5, 3, 64, 64)
    whole = encoder.encode_images(pixels)
    assert whole.shape == (5, 64) and whole.dtype == np.float32
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    one_by_one = np.vstack([encoder.encode_images(pixels[i : i + 1]) for i in range(5)])
    assert np.allclose(whole, one_by_one, atol=1e-5)  # a row never depends on its batch
    texts = encoder.encode_texts(["a red square", "a blue circle", "x " * 100])  # long: truncated
    assert texts.shape == (3, 64) and np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, 64)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="precision 'fp8': use one of fp32, fp16, bf16"):
        ClipEncoder(TINY, precision="fp8")
    with pytest.raises(ValueError, match="needs a GPU"):
        ClipEncoder(TINY, precision="fp16")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        ClipEncoder("/nowhere.json")


def test_preprocessing_from_configs_matches_the_encoder(encoder):
    """Decode tasks preprocess without the model: same settings and pixels as the encoder's."""
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    from condense.stages.embed.clip import image_transform, preprocess_config

    cfg = preprocess_config(TINY)
    assert cfg == encoder.model.visual.preprocess_cfg
    image = Image.new("RGB", (90, 50), (10, 200, 30))
    assert np.array_equal(image_transform(cfg)(image).numpy(), encoder.preprocess(image).numpy())
    # A registry model with a tag (its own mean, std and resize mode), as open_clip derives it
    # when it builds the model, here without building any weights.
    built = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, device="meta")
    tag = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    want = merge_preprocess_dict(dict(built.visual.preprocess_cfg), tag)
    assert preprocess_config("ViT-B-16-SigLIP", "webli") == want
    assert want["resize_mode"] == "squash" and want["mean"] == (0.5, 0.5, 0.5)
