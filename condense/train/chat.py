"""`condense chat`: load a trained stage's outputs and answer a question about an image."""

from __future__ import annotations

from pathlib import Path

from condense.errors import InputError


def load_trained(model_dir: str | Path):
    """(model, tokenizer, config) from RUN/train/<stage>/: the config it ran with, the projector,
    the peft adapter and the vision tower's weights when it trained them."""
    from condense.strict import load_yaml
    from condense.train.config import TrainConfig
    from condense.train.loop import PROJECTOR_FILE, load_projector
    from condense.train.run import build_model

    folder = Path(model_dir)
    if not (folder / "config.yaml").is_file() or not (folder / PROJECTOR_FILE).is_file():
        raise InputError(f"{folder}: not a trained stage (config.yaml, mm_projector.safetensors)")
    cfg = load_yaml(folder / "config.yaml", TrainConfig)
    model, tokenizer = build_model(cfg)
    load_projector(model, folder / PROJECTOR_FILE)
    if (folder / "merged").is_dir():  # the adapter already folded in
        from condense.train.model import build_llm

        model.llm = build_llm(str(folder / "merged"))
    elif (folder / "adapter").is_dir():
        from peft import PeftModel

        try:
            model.llm = PeftModel.from_pretrained(model.llm, str(folder / "adapter"))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign adapter
            raise InputError(f"{folder / 'adapter'}: not a readable peft adapter ({exc})") from None
    if (folder / "vision_tower.safetensors").is_file():
        from condense.train.loop import load_safetensors

        model.vision.load_state_dict(load_safetensors(folder / "vision_tower.safetensors"))
    model.eval()
    return model, tokenizer, cfg


def answer(
    model, tokenizer, cfg, image: bytes | None, question: str, max_new_tokens: int = 64, limits=None
):
    """The model's answer (greedy) to `question` about `image` (decoded within `limits`: the
    trained stage's data.limits by default)."""
    import numpy as np
    import torch

    from condense.train.data import pixels
    from condense.train.templates import IMAGE, prompt

    pix = None
    if image is not None:
        limits = limits if limits is not None else cfg.data.limits
        size, mean, std = model.vision.image_size, model.vision.mean, model.vision.std
        pix, reason = pixels(image, size, mean, std, limits)
        if pix is None:
            raise InputError(f"the image cannot be used ({reason})")
        if IMAGE not in question:
            question = f"{IMAGE}\n{question}"
    ids = prompt(question, cfg.template, tokenizer)
    images = torch.from_numpy(np.stack([pix])) if pix is not None else None
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        batch = model.merge([ids], None, images)
        out = model.llm.generate(
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()
