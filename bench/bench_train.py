"""Benchmark: condense's training loop against a plain Hugging Face `Trainer` loop.

    python bench/bench_train.py [--samples 256 --epochs 2 --repeats 2]

Both sides train the same small random-weight Bunny model (a CLIP vision tower, the mlp2x_gelu
projector, a Llama LLM with a byte tokenizer) on the same LLaVA-style samples, with the same
optimizer (AdamW, the stage's parameter groups), cosine schedule, per-device batch, gradient
accumulation and clipping, in the same process, alternating, best of `--repeats`. Each side's
time covers the whole of training, images decoded and text tokenised on the fly:

- Trainer: `transformers.Trainer` over a torch Dataset whose items decode the image and apply
  the template, a collator that stacks the pixels, the model's own forward and loss;
- condense: `condense.train.loop.train`, as `condense train` runs it on one worker.

Stage 1 trains the projector; stage 2 LoRA adapters and the projector. It prints samples/s and
trained tokens/s for each and the ratio (target: condense >= 1.0x the Trainer).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VISION = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
LLM = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}


def make_samples(n: int, seed: int = 0) -> list:
    """(turns, PNG bytes) pairs: smooth random 96 px images, a question and a caption."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((96, 96), Image.BICUBIC).save(buf, "PNG")
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 500, 12))
        turns = [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": f"sample {i}: {words}"},
        ]
        out.append((turns, buf.getvalue()))
    return out


def build(seed: int = 0):
    from condense.train.model import PROJECTORS, VISION_TOWERS, BunnyModel, build_llm, pick

    torch.manual_seed(seed)
    vision = pick(VISION_TOWERS, "hf-clip", "vision tower")(config=VISION, layer=-2)
    llm = build_llm(config=LLM)
    projector = pick(PROJECTORS, "mlp2x_gelu", "projector")(vision.hidden_size, LLM["hidden_size"])
    return BunnyModel(vision, projector, llm)


def loop_config(stage: str, epochs: int):
    from condense.train.config import TrainConfig

    common = dict(global_batch=32, per_device_batch=8, epochs=epochs, max_length=512)
    common.update(log_every=10**9)
    if stage == "stage1":
        return TrainConfig(stage="stage1", template="plain", lr=5e-4, **common)
    lora = {"r": 16, "alpha": 32}
    return TrainConfig(stage="stage2", template="bunny", lr=2e-4, lora=lora, **common)


def run_condense(stage: str, data: list, epochs: int) -> tuple[float, int, list]:
    from condense.train.loop import train
    from condense.train.tokenizers import byte_tokenizer

    model = build()
    cfg = loop_config(stage, epochs)
    image_size = model.vision.image_size
    start = time.perf_counter()
    result = train(model, lambda: data, len(data), byte_tokenizer(), image_size, cfg, log=print)
    return time.perf_counter() - start, result.tokens, result.losses


class Samples(torch.utils.data.Dataset):
    """Items decoded and templated on access, as the condense loop does."""

    def __init__(self, data, template, tokenizer, image_size, max_length):
        self.data, self.template, self.tokenizer = data, template, tokenizer
        self.image_size, self.max_length = image_size, max_length

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from condense.train.data import load_image
        from condense.train.templates import encode

        turns, image = self.data[i]
        ids, labels, _ = encode(turns, self.template, self.tokenizer, self.max_length)
        return {
            "ids": ids,
            "labels": labels,
            "pixels": load_image(image, self.image_size, Counter()),
        }


def collate(items):
    return {
        "input_ids": [x["ids"] for x in items],
        "labels": [x["labels"] for x in items],
        "pixels": torch.from_numpy(np.stack([x["pixels"] for x in items])),
    }


def run_trainer(stage: str, data: list, epochs: int, scratch: Path) -> tuple[float, int, list]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from condense.train.loop import cosine, freeze_for_stage1, prepare_stage2
    from condense.train.tokenizers import byte_tokenizer

    model = build()
    cfg = loop_config(stage, epochs)
    if stage == "stage1":
        freeze_for_stage1(model)
        groups = [{"params": list(model.projector.parameters()), "lr": cfg.lr}]
    else:
        groups = prepare_stage2(model, cfg)
    accumulate = cfg.global_batch // cfg.per_device_batch
    total = -(-len(data) // cfg.global_batch) * epochs
    warmup = max(1, round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total, warmup))
    args = TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=epochs,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    losses: list = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    tok = byte_tokenizer()
    dataset = Samples(data, cfg.template, tok, model.vision.image_size, cfg.max_length)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        optimizers=(opt, sched),
        callbacks=[Losses()],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = (
        sum(sum(1 for x in dataset[i]["labels"] if x != -100) for i in range(len(dataset))) * epochs
    )
    return seconds, tokens, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="stage1,stage2")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    data = make_samples(args.samples)
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for stage in args.stages.split(","):
            times = {"trainer": [], "condense": []}
            tokens = {}
            for _ in range(args.repeats):
                s, tokens["trainer"], hf_losses = run_trainer(
                    stage, data, args.epochs, Path(scratch)
                )
                times["trainer"].append(s)
                s, tokens["condense"], our_losses = run_condense(stage, data, args.epochs)
                times["condense"].append(s)
            n = args.samples * args.epochs
            print(
                f"\n{stage}: {args.samples} samples x {args.epochs} epochs, "
                f"global batch 32 (8 x 4 accumulated), {torch.get_num_threads()} threads"
            )
            print(f"{'method':<10} {'best s':>8} {'runs':>18} {'samples/s':>10} {'tokens/s':>10}")
            best = {}
            for name in ("trainer", "condense"):
                best[name] = min(times[name])
                runs = ", ".join(f"{t:.1f}" for t in times[name])
                print(
                    f"{name:<10} {best[name]:>8.1f} {runs:>18} {n / best[name]:>10.1f} "
                    f"{tokens[name] / best[name]:>10.0f}"
                )
            ratio = best["trainer"] / best["condense"]
            print(f"ratio (condense / Trainer throughput): {ratio:.2f}x")
            print(
                f"first/last loss: Trainer {hf_losses[0]:.3f}/{hf_losses[-1]:.3f}, "
                f"condense {our_losses[0]:.3f}/{our_losses[-1]:.3f}"
            )
            report[stage] = {"times": times, "tokens": tokens, "ratio": ratio}
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
