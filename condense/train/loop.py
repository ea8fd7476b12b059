"""One worker's training loop (plain PyTorch, no Ray): stage 1 trains the projector only;
stage 2 trains LoRA adapters on the LLM's linear layers (lm_head excepted) and the projector
at its own rate (and the vision tower, when unfrozen).

Batches of `per_device_batch` samples; gradients accumulate to `global_batch`; AdamW with a
cosine schedule after a linear warmup; bf16 autocast on GPUs that have it. Samples that cannot
be used (an image that does not decode, text past max_length: truncated) are counted, never
raised mid-epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from condense.train.data import load_image
from condense.train.model import BunnyModel
from condense.train.templates import encode

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopConfig:
    lr: float = 5e-4
    global_batch: int = 256
    per_device_batch: int = 8
    epochs: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    template: str = "plain"
    seed: int = 0
    stage: str = "stage1"  # stage1: the projector; stage2: LoRA adapters + projector (+ vision)
    mm_projector_lr: float = 2e-5  # stage 2: projector (and unfrozen vision tower) rate
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    unfreeze_vision: bool = False
    checkpoint_dir: Path | None = None  # where checkpoint.pt goes (None: no checkpoints)
    save_every: int = 100  # optimizer steps between checkpoints (and one at each epoch end)
    resume: bool = False  # continue from checkpoint_dir/checkpoint.pt when it exists
    max_steps: int | None = None  # stop after this many steps (a checkpoint is written first)
    log_every: int = 10  # steps between progress lines when there is no terminal
    gradient_checkpointing: bool = False  # recompute the LLM's activations in the backward pass
    progress_bar: bool = True  # a tqdm bar when stderr is a terminal


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    trainable: int = 0


def freeze_for_stage1(model: BunnyModel) -> None:
    """Vision tower and LLM frozen, in eval mode; the projector trains."""
    model.requires_grad_(False)
    model.eval()
    model.projector.requires_grad_(True)
    model.projector.train()


def prepare_stage2(model: BunnyModel, cfg: LoopConfig) -> list[dict]:
    """LoRA (peft) on every linear layer of the LLM but lm_head, its base weights frozen; the
    projector trains at mm_projector_lr, the vision tower too when unfrozen. Returns the
    optimizer's parameter groups."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",  # peft leaves the output layer (lm_head) out
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, lora)
    model.train()
    model.projector.requires_grad_(True)
    slow = list(model.projector.parameters())
    if cfg.unfreeze_vision:
        model.vision.requires_grad_(True)
        slow += list(model.vision.parameters())
    else:
        model.vision.eval()
    adapters = [p for p in model.llm.parameters() if p.requires_grad]
    return [
        {"params": adapters, "lr": cfg.lr},
        {"params": slow, "lr": cfg.mm_projector_lr},
    ]


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: BunnyModel,
    samples: Callable[[], Iterable[tuple[list[dict], bytes | None]]],
    n_samples: int,
    tokenizer,
    image_size: int,
    cfg: LoopConfig,
    log: Callable[[str], None] = print,
) -> LoopResult:
    torch.manual_seed(cfg.seed)
    if cfg.stage == "stage2":
        groups = prepare_stage2(model, cfg)
        what = "LoRA adapters and the projector" + (
            ", the vision tower" if cfg.unfreeze_vision else ""
        )
    else:
        freeze_for_stage1(model)
        groups = [{"params": list(model.projector.parameters()), "lr": cfg.lr}]
        what = "the projector"
    if cfg.gradient_checkpointing:
        llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for g in groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    log(f"[train] {cfg.stage}: {trainable:,} trainable parameters ({what})")
    accumulate = max(1, cfg.global_batch // cfg.per_device_batch)
    steps_per_epoch = max(1, math.ceil(n_samples / (cfg.per_device_batch * accumulate)))
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total, warmup))
    device = next(model.projector.parameters()).device
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    result = LoopResult(steps=0, trainable=trainable)
    skipped: Counter = Counter()
    start = time.perf_counter()
    window = {"micro": 0, "loss": 0.0, "tokens": 0}  # micro-batches since the last step

    def micro_step(batch: list) -> None:
        loss, tokens = _micro_step(model, batch, device, autocast, accumulate)
        window["micro"] += 1
        window["loss"] += loss
        window["tokens"] += tokens
        result.samples += len(batch)

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.steps += 1
        result.losses.append(window["loss"])
        result.tokens += window["tokens"]
        window.update(micro=0, loss=0.0, tokens=0)
        report()

    def report() -> None:
        """Loss, tokens/s and time left: a live bar on a terminal, else a line every
        log_every steps (and at the last step), for logs such as `ray job logs`."""
        elapsed = time.perf_counter() - start
        done = result.steps - first_step
        left = elapsed / done * (total - result.steps) if done else 0.0
        rate = (result.tokens - first_tokens) / max(elapsed, 1e-9)
        text = f"loss {result.losses[-1]:.4f} | {rate:,.0f} tokens/s | {left:,.0f} s left"
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(text)
        elif result.steps % cfg.log_every == 0 or result.steps == total:
            log(f"[train] step {result.steps}/{total}: {text}")

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    path = Path(cfg.checkpoint_dir) / CHECKPOINT if cfg.checkpoint_dir else None

    def save(epoch: int, position: int) -> None:
        """Trainable weights, optimizer, scheduler, RNG and the data position, atomically."""
        import os

        state = {
            "params": {n: p.detach().cpu() for n, p in named},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "position": position,
            "steps": result.steps,
            "losses": result.losses,
            "samples": result.samples,
            "tokens": result.tokens,
            "skipped": dict(skipped),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    first_epoch, skip = 0, 0
    if cfg.resume and path is not None and path.exists():
        state = torch.load(path, weights_only=True)
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        first_epoch, skip = state["epoch"], state["position"]
        result.steps, result.losses = state["steps"], list(state["losses"])
        result.samples, result.tokens = state["samples"], state["tokens"]
        skipped.update(state["skipped"])
        log(f"[train] resuming at step {result.steps} (epoch {first_epoch + 1}, sample {skip})")

    def stop() -> bool:
        return cfg.max_steps is not None and result.steps >= cfg.max_steps

    first_step, first_tokens = result.steps, result.tokens  # this run's share, for rates
    bar = None
    if cfg.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=result.steps, desc=cfg.stage, unit="step")

    for epoch in range(first_epoch, cfg.epochs):
        batch: list = []
        position = 0  # samples drawn from this epoch's stream
        for turns, image in samples():
            position += 1
            if skip:  # consumed before the checkpoint this run resumed from
                skip -= 1
                continue
            pix = load_image(image, image_size, skipped)
            if image is not None and pix is None:
                continue
            try:
                ids, labels, truncated = encode(turns, cfg.template, tokenizer, cfg.max_length)
            except ValueError:
                skipped["bad_turns"] += 1
                continue
            skipped["truncated"] += int(truncated)
            batch.append((ids, labels, pix))
            if len(batch) == cfg.per_device_batch:
                micro_step(batch)
                batch = []
                if window["micro"] == accumulate:
                    optimizer_step()
                    if path is not None and (result.steps % cfg.save_every == 0 or stop()):
                        save(epoch, position)
                    if stop():
                        break
        if stop() and not batch and not window["micro"]:
            break
        if batch:  # the epoch's last, smaller batch
            micro_step(batch)
        if window["micro"]:  # the epoch ends with a step
            optimizer_step()
        if path is not None:
            save(epoch + 1, 0)
        if stop():
            break
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.skipped = {k: v for k, v in skipped.items() if v}
    return result


def _micro_step(model, batch, device, autocast: bool, accumulate: int) -> tuple[float, int]:
    ids = [b[0] for b in batch]
    labels = [b[1] for b in batch]
    images = [b[2] for b in batch if b[2] is not None]
    pixels = torch.from_numpy(np.stack(images)).to(device) if images else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels, pixels)
    (out.loss / accumulate).backward()
    tokens = sum(sum(1 for x in lab if x != -100) for lab in labels)
    return float(out.loss.detach()) / accumulate, tokens


def load_projector(model: BunnyModel, path: Path) -> None:
    """Stage 1's projector weights into `model` (exact keys, exact shapes)."""
    from safetensors.torch import load_file

    state = {k.removeprefix("projector."): v for k, v in load_file(str(path)).items()}
    model.projector.load_state_dict(state, strict=True)


def save_projector(model: BunnyModel, folder: Path) -> Path:
    """The projector's weights in safetensors (Hugging Face convention: mm_projector)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mm_projector.safetensors"
    state = {
        f"projector.{k}": v.detach().cpu().contiguous()
        for k, v in model.projector.state_dict().items()
    }
    save_file(state, str(path))
    return path
