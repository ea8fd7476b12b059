"""The CLIP model that embeds images and captions: its config, and open_clip behind one class.

Callable without Ray (a GPU benchmark script uses it as is); the embed stage runs it in an
actor pool. A model is named by open_clip's registry (`ViT-L-14` with a pretrained tag such as
`laion2b_s32b_b82k`, or `pretrained=None` for random weights), or by a model config JSON file
(`configs/models/tiny-clip.json`), which is read here and built without touching open_clip's
global registry. `checkpoint` loads local weights instead of a tag, so nothing is downloaded
at run time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from condense.strict import StrictModel

PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_WEIGHTS_SEED = 0


class ModelConfig(StrictModel):
    """The CLIP model that embeds images and captions (input.kind: webdataset or urls)."""

    # open_clip model name (ViT-L-14), or a model config JSON (configs/models/tiny-clip.json).
    name: str = "ViT-L-14"
    pretrained: str | None = None  # open_clip pretrained tag, e.g. laion2b_s32b_b82k
    checkpoint: str | None = None  # a local weights file instead of a tag (nothing downloads)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPUs, else fp32
    # Who decodes images: pil (Pillow, on CPUs), device (plain JPEGs by torchvision on the
    # encoder's device, nvJPEG on GPUs; Pillow for the rest), auto (device on GPUs, else pil).
    decode: Literal["auto", "pil", "device"] = "auto"
    batch_size: int = Field(64, ge=1)  # images per forward pass

    runtime_fields = frozenset({"batch_size"})


def model_config(model: str) -> dict:
    """The open_clip model config of `model`: read from its JSON file, or the registry's."""
    import copy

    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model config {model} does not exist")
        return json.loads(path.read_text())
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    return copy.deepcopy(cfg)


def create_model(model: str, weights: str | None = None, device: str = "cpu"):
    """An open_clip CLIP model: `weights` is a pretrained tag or a local checkpoint file (None:
    random weights). A JSON config is built from the file, as open_clip builds registry names."""
    import open_clip

    if not model.endswith(".json"):
        return open_clip.create_model(model, pretrained=weights, device=device)
    from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg

    cfg = model_config(model)
    cfg.pop("preprocess_cfg", None)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    net = (CustomTextCLIP if custom else CLIP)(**cfg)
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"{weights}: a model config JSON takes a local checkpoint file, not a tag"
            )
        open_clip.load_checkpoint(net, weights, weights_only=True)
    set_model_preprocess_cfg(net, preprocess_config(model))
    return net.to(device)


def create_tokenizer(model: str):
    """The tokenizer of `model` (a JSON config: its text tower's, as open_clip picks it)."""
    import open_clip

    if not model.endswith(".json"):
        return open_clip.get_tokenizer(model)
    text = model_config(model).get("text_cfg", {})
    context = text.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    kwargs = text.get("tokenizer_kwargs", {})
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text["hf_tokenizer_name"], context_length=context, **kwargs
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=context, **kwargs)


def preprocess_config(model: str, pretrained: str | None = None) -> dict:
    """The image preprocessing (size, mean, std, interpolation, resize mode) the encoder of
    `model` with `pretrained` uses, from configs alone (no weights are built), as open_clip
    derives it: its defaults, the model config's `preprocess_cfg`, a pretrained tag's own
    settings, the vision tower's image size. Decode tasks preprocess on CPUs with it while the
    model lives in the encoder actors. A checkpoint file adds nothing (pass pretrained=None)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model_cfg = model_config(model)
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    if pretrained and not Path(pretrained).exists():  # a tag: its own normalisation
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model, pretrained))
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
        batch_size: int = 64,
    ):
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"precision {precision} needs a GPU; on {device} use fp32")
        self.torch, self.device, self.batch_size = torch, device, batch_size
        # Weights not loaded are drawn from a fixed seed, so every actor of a pool (and every
        # run) builds the same random model: embeddings never depend on which actor ran.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            self.model = create_model(model, checkpoint or pretrained, device)
        self.model.eval().requires_grad_(False)
        self.preprocess = image_transform(
            preprocess_config(model, None if checkpoint else pretrained)
        )
        self.tokenizer = create_tokenizer(model)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            precision
        ]
        self.trim = _trimmable_text(self.model)
        with torch.inference_mode():  # the embedding width, for shards without a usable sample
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])

    def pixels(self, images: Sequence) -> object:
        """Preprocess PIL RGB images (resize, crop, normalise) into one CPU batch tensor."""
        return self.torch.stack([self.preprocess(image) for image in images])

    def encode_images(self, pixels) -> np.ndarray:
        """Unit float32 image embeddings of a preprocessed batch."""
        return self._encode(self.model.encode_image, pixels)

    def embed_images(self, pixels):
        """`encode_images` left on the device (a torch tensor): nothing waits for the device,
        so the next batch is decoded while this one is encoded."""
        return self._on_device(self.model.encode_image, pixels)

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        """Unit float32 text embeddings (captions longer than the context are truncated), in
        the captions' order, computed `batch_size` at a time in order of token length. With
        open_clip's causal text tower (whose pooled token sees nothing after it), each batch is
        cut after its longest caption's last token: the padding it drops changes no embedding
        beyond float rounding, and a short caption no longer costs a full context."""
        torch = self.torch
        tokens = self.tokenizer(list(captions))
        order, lengths, fn = torch.arange(len(tokens)), None, self.model.encode_text
        if self.trim:
            # A caption's length is its last nonzero token's position + 1: id 0 pads, but it
            # is also a real token (a "!" before another piece, as in "!\"").
            nonzero = (tokens != 0).int()
            lengths = torch.where(
                nonzero.any(dim=1),
                tokens.shape[1] - nonzero.flip(dims=[1]).argmax(dim=1),
                torch.zeros(len(tokens), dtype=torch.long),
            )
            order, fn = torch.argsort(lengths, stable=True), self._text_prefix
        out = np.empty((len(tokens), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            cut = tokens.shape[1] if lengths is None else max(1, int(lengths[rows].max()))
            out[rows.numpy()] = self._encode(fn, tokens[rows, :cut])
        return out

    def _text_prefix(self, tokens):
        """open_clip's CLIP.encode_text on the first tokens.shape[1] positions of the context."""
        from open_clip.transformer import text_global_pool

        m = self.model
        n = tokens.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(
            x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        if isinstance(m.text_projection, self.torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection if m.text_projection is not None else x

    def _encode(self, fn, batch) -> np.ndarray:
        return self._on_device(fn, batch).cpu().numpy()

    def _on_device(self, fn, batch):
        torch = self.torch
        if len(batch) == 0:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device.split(":")[0],
                dtype=self.dtype,
                enabled=self.dtype != torch.float32,
            ),
        ):
            out = fn(batch.to(self.device, non_blocking=True)).float()
        return torch.nn.functional.normalize(out, dim=-1)


def _trimmable_text(model) -> bool:
    """Whether the model's text tower is open_clip's causal transformer pooled at the end-of-text
    token (or the first): then the padding after a batch's longest caption changes nothing.
    Older open_clip releases pool with another signature: they get the full context."""
    import inspect

    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    return (
        type(model) is CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
        and "eos_token_id" in inspect.signature(text_global_pool).parameters
    )
