"""CLIP image and text embeddings with open_clip: one model, batches in, unit float32 rows out.

Callable without Ray (a GPU benchmark script uses it as is); the embed stage wraps it in a Ray
actor pool. The model is named by open_clip's registry (`ViT-L-14` with a pretrained tag such as
`laion2b_s32b_b82k`, or `pretrained=None` for random weights), or by a model config JSON file
(`configs/models/tiny-clip.json`, registered under its file stem). `checkpoint` loads local
weights instead of a tag, so nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_WEIGHTS_SEED = 0


def register(model: str) -> str:
    """The open_clip name of `model`: a registry name as is, or a model config JSON registered
    under its file stem."""
    import open_clip

    if not model.endswith(".json"):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model config {model} does not exist")
    open_clip.add_model_config(path)
    return path.stem


def preprocess_config(model: str, pretrained: str | None = None) -> dict:
    """The image preprocessing (size, mean, std, interpolation, resize mode) the encoder of
    `model` with `pretrained` uses, from configs alone (no weights are built), as open_clip
    derives it: its defaults, the model config's `preprocess_cfg`, a pretrained tag's own
    settings, the vision tower's image size. Decode tasks preprocess on CPUs with it while the
    model lives in the encoder actors. A checkpoint file adds nothing (pass pretrained=None)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    name = register(model)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    if pretrained and not Path(pretrained).exists():  # a tag: its own normalisation
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(name, pretrained))
    size = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    return cfg


def image_transform(cfg: dict):
    """PIL image -> preprocessed CHW float tensor, for a `preprocess_config`."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


class ClipEncoder:
    """An open_clip model on one device, in eval mode, for inference only."""

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
    ):
        import open_clip
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"precision {precision} needs a GPU; on {device} use fp32")
        name = register(model)
        self.torch, self.device = torch, device
        # Weights not loaded are drawn from a fixed seed, so every actor of a pool (and every
        # run) builds the same random model: embeddings never depend on which actor ran.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=checkpoint or pretrained, device=device
            )
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            precision
        ]
        self.dim = (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else None
        )

    def pixels(self, images: Sequence) -> object:
        """Preprocess PIL RGB images (resize, crop, normalise) into one CPU batch tensor."""
        return self.torch.stack([self.preprocess(image) for image in images])

    def encode_images(self, pixels) -> np.ndarray:
        """Unit float32 image embeddings of a preprocessed batch."""
        return self._encode(self.model.encode_image, pixels)

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        """Unit float32 text embeddings (captions longer than the context are truncated)."""
        return self._encode(self.model.encode_text, self.tokenizer(list(captions)))

    def _encode(self, fn, batch) -> np.ndarray:
        torch = self.torch
        if len(batch) == 0:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device.split(":")[0],
                dtype=self.dtype,
                enabled=self.dtype != torch.float32,
            ),
        ):
            out = fn(batch.to(self.device, non_blocking=True)).float()
        out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)
