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
        name = model
        if model.endswith(".json"):  # a model config file: register it under its stem
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"model config {model} does not exist")
            open_clip.add_model_config(path)
            name = path.stem
        self.torch, self.device = torch, device
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
