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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from condense.errors import InputError
from condense.faults import kill_once
from condense.pipeline.rundir import atomic_file
from condense.readers.shards import DEFAULT_LIMITS, ShardLimits
from condense.train.data import load_image
from condense.train.model import BunnyModel, base_llm
from condense.train.parallel import Single
from condense.train.templates import IGNORE, IMAGE_TOKEN, encode

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
    # What a checkpoint must have been made with to be resumed (settings and data identity):
    # resuming with another LoRA rank, unfrozen vision or other data is refused by name.
    settings: dict = field(default_factory=dict)
    limits: ShardLimits = DEFAULT_LIMITS  # bounds on the images decoded (data.limits)


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    tokens_per_second: float = 0.0  # this run's (a resumed run: since it resumed)
    resumed_at: int | None = None  # the step a checkpoint resumed from (--resume, a restart)


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
    samples: Callable[[], Iterable[tuple[list[dict], bytes | Path | None]]],
    n_samples: int,
    tokenizer,
    image_size: int,
    cfg: LoopConfig,
    log: Callable[[str], None] = print,
    parallel: Single | None = None,
) -> LoopResult:
    """Train `model` on `samples` (one epoch's stream, the same on every worker).

    Each optimizer step takes the next `global_batch` samples of the stream in blocks of
    `per_device_batch`; block j goes to worker j % world, so any number of workers sees the
    same steps as one (the global batch is a multiple of per_device_batch x workers). Each
    micro-batch's mean loss is divided by the micro-batches per worker per step, and DDP/FSDP
    average the gradients over the workers: the gradient one worker would compute.
    """
    parallel = parallel or Single()
    if not parallel.is_main:
        log = _silent
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every worker
    per_step = cfg.per_device_batch * parallel.world
    if cfg.global_batch % per_step:
        raise ValueError(
            f"global_batch {cfg.global_batch} is not a multiple of per_device_batch "
            f"{cfg.per_device_batch} x {parallel.world} worker(s)"
        )
    model.to(parallel.device)
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
        llm = base_llm(model.llm)
        checkpoint_activations(llm)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in g["params"]] for g in groups]
    # Stage 2 has text-only samples: the projector may be left out of a batch's graph.
    module = parallel.wrap(model, text_only_batches=cfg.stage == "stage2")
    own = dict(model.named_parameters())  # FSDP has replaced them with sharded ones
    groups = [{**g, "params": [own[n] for n in ns]} for g, ns in zip(groups, names, strict=True)]
    torch.manual_seed(cfg.seed + parallel.rank)  # and each its own LoRA dropout
    params = [p for g in groups for p in g["params"]]
    trainable_names = [n for ns in names for n in ns]
    image_params = [own[n] for n in trainable_names if n.startswith(("projector.", "vision."))]
    log(f"[train] {cfg.stage}: {trainable:,} trainable parameters ({what})")
    full = cfg.global_batch // cfg.per_device_batch  # blocks (micro-batches) in a whole step
    steps_per_epoch = max(1, math.ceil(n_samples / cfg.global_batch))
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total, warmup))
    device = parallel.device
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    result = LoopResult(steps=0, trainable=trainable)
    skipped: Counter = Counter()
    start = time.perf_counter()
    window = {"loss": 0.0, "tokens": 0, "samples": 0, "images": 0}  # this worker's, this step
    dummy = _dummy_batch(tokenizer, image_size)
    mean, std = getattr(model.vision, "mean", None), getattr(model.vision, "std", None)

    def micro_step(batch: list | None, last: bool, weight: float) -> None:
        """Forward and backward of one micro-batch, its mean loss weighted by 1 / the
        micro-batches per worker in a step (DDP and FSDP then average over the workers: the
        step's gradient is the mean over its micro-batches; a short last step is scaled up
        before the optimizer steps). Gradients are all-reduced on the last micro-batch of a
        step. An empty one (its samples all skipped, or past the stream's end on this
        worker) runs a zero-weight pass, so every worker joins every all-reduce."""
        if not batch and parallel.world == 1:
            return
        with nullcontext() if last else parallel.no_sync(module):
            loss, tokens = _micro_step(
                module, batch or dummy, device, autocast, weight * bool(batch)
            )
        if batch:
            window["loss"] += loss
            window["tokens"] += tokens
            window["samples"] += len(batch)
            window["images"] += sum(1 for b in batch if b[2] is not None)

    def optimizer_step() -> None:
        loss, tokens, count, images = parallel.sum([window[k] for k in window])
        # What one process would leave without a gradient (None: AdamW leaves it alone, no
        # momentum step) stays so: everything in a step with no sample, the image side
        # (projector, vision tower) in a step without images; zero-weight passes gave zeros.
        unused = params if not count else image_params if not images else []
        for p in unused:
            p.grad = None
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # DTensor-aware under FSDP
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.steps += 1
        result.losses.append(loss / parallel.world)
        result.tokens += int(tokens)
        result.samples += int(count)
        window.update(loss=0.0, tokens=0, samples=0, images=0)
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

    path = Path(cfg.checkpoint_dir) / CHECKPOINT if cfg.checkpoint_dir else None

    def save(epoch: int, position: int) -> None:
        """Trainable weights, optimizer, scheduler, RNG and the data position, atomically."""
        weights, opt_state = parallel.state(model, opt, trainable_names)
        rng = parallel.gather(_rng_state(device))
        counts = parallel.gather(dict(skipped))
        if not parallel.is_main:
            return
        state = {
            "settings": cfg.settings,
            "params": weights,
            "optimizer": opt_state,
            "scheduler": sched.state_dict(),
            "rng": rng,
            "epoch": epoch,
            "position": position,
            "global_batch": cfg.global_batch,
            "steps": result.steps,
            "losses": result.losses,
            "samples": result.samples,
            "tokens": result.tokens,
            "skipped": dict(sum((Counter(c) for c in counts), Counter())),
        }
        with atomic_file(path) as f:  # a unique temporary name, fsynced, then renamed
            torch.save(state, f)

    first_epoch, skip = 0, 0
    if cfg.resume and path is not None and path.exists():
        state = load_checkpoint(path)
        check_resumable(path, state, cfg)
        parallel.load_state(model, opt, state["params"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["rng"]  # each worker its own draws; with another worker count, derived ones
        if len(rng) == parallel.world:
            _set_rng_state(rng[parallel.rank], device)
        else:
            torch.manual_seed(cfg.seed + parallel.rank + 1000 * state["steps"])
        first_epoch, skip = state["epoch"], state["position"]
        result.steps, result.losses = state["steps"], list(state["losses"])
        result.samples, result.tokens = state["samples"], state["tokens"]
        result.resumed_at = state["steps"]
        if parallel.is_main:  # the counts of all workers, summed once
            skipped.update(state["skipped"])
        log(f"[train] resuming at step {result.steps} (epoch {first_epoch + 1}, sample {skip})")

    def stop() -> bool:
        return cfg.max_steps is not None and result.steps >= cfg.max_steps

    def prepare(sample: tuple[list[dict], bytes | None]):
        turns, image = sample
        if image is None and cfg.stage == "stage1":
            skipped["no_image"] += 1  # nothing for the projector to learn from
            return None
        pix = load_image(image, image_size, skipped, mean, std, cfg.limits)
        if image is not None and pix is None:
            return None
        try:
            ids, labels, truncated = encode(turns, cfg.template, tokenizer, cfg.max_length)
        except ValueError:
            skipped["bad_turns"] += 1
            return None
        if ids.count(IMAGE_TOKEN) != (pix is not None):  # cut off by max_length, or a
            skipped["image_token_mismatch"] += 1  # caption that itself says <image>
            return None
        if all(x == IGNORE for x in labels):  # truncated before the answer: nothing to learn
            skipped["no_target"] += 1
            return None
        skipped["truncated"] += int(truncated)
        return ids, labels, pix

    first_step, first_tokens = result.steps, result.tokens  # this run's share, for rates
    bar = None
    if cfg.progress_bar and parallel.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=result.steps, desc=cfg.stage, unit="step")

    for epoch in range(first_epoch, cfg.epochs):
        blocks = _micro_batches(
            samples(), skip, cfg.global_batch, cfg.per_device_batch, parallel, prepare
        )
        skip = 0
        for batch, end, count in blocks:
            micro_step(batch, last=end is not None, weight=parallel.world / full)
            if end is None:
                continue
            if count < full:  # a short last step: the mean over the blocks it has
                _scale_gradients(params, full / count)
                window["loss"] *= full / count
            optimizer_step()
            if end == 0:  # the epoch's end
                if path is not None:
                    save(epoch + 1, 0)
            elif path is not None and (result.steps % cfg.save_every == 0 or stop()):
                save(epoch, end)
            kill_once("train_kill", f"{parallel.rank}-{result.steps}")  # a test's worker killed
            if stop():
                break
        if stop():
            break
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.tokens_per_second = (result.tokens - first_tokens) / max(result.seconds, 1e-9)
    total_skipped = sum((Counter(c) for c in parallel.gather(dict(skipped))), Counter())
    result.skipped = {k: v for k, v in sorted(total_skipped.items()) if v}
    return result


def _silent(_: str) -> None:
    pass


def checkpoint_activations(llm) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' own
    mechanism). It acts only on layers in training mode; a frozen LLM (stage 1) stays in eval
    mode below the layer, so dropout stays off while its layers are checkpointed."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # the newer name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in llm.modules():
        if getattr(module, "gradient_checkpointing", None) is True:
            module.training = True  # this module only: its children keep their mode


def _scale_gradients(params: list[torch.Tensor], factor: float) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)


def _rng_state(device: torch.device) -> dict:
    """The random state dropout draws from: the CPU's, and the GPU's where it runs."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _micro_batches(stream, skip: int, span: int, size: int, parallel: Single, prepare):
    """This worker's micro-batches, as (batch, end, blocks): end is None inside a step, else
    the stream position after the step, or 0 after the epoch's last step; with an end, blocks
    is the number of blocks (micro-batches of all workers) the step had: fewer than a whole
    step's in an epoch's short last step.

    A step covers `span` consecutive samples (from position `skip`), in blocks of `size`;
    block j is this worker's when j % world == rank. Every worker yields the same number of
    micro-batches per step, an empty one (None) where it has no block. A block's unusable
    samples are dropped (prepare returns None), so a micro-batch may be short or empty.
    """
    rank, world = parallel.rank, parallel.world
    full = span // size  # blocks in a whole step
    held = None  # this worker's last finished block, yielded when the next one or the step ends
    block: list = []
    n = 0  # samples of the current step seen so far
    for position, sample, last in _flag_last(stream):
        if position < skip:
            continue
        mine = (n // size) % world == rank
        if mine:
            item = prepare(sample)
            if item is not None:
                block.append(item)
        n += 1
        if mine and n % size == 0:
            if held is not None:
                yield held, None, full
            held, block = block, []
        if n == span:
            yield held, 0 if last else position + 1, full
            held, n = None, 0
    if not n:
        return
    blocks = math.ceil(n / size)  # in this last, short step
    if ((n - 1) // size) % world == rank and n % size:  # this worker's unfinished last block
        if held is not None:
            yield held, None, blocks
        held, block = block, []
    slots = math.ceil(blocks / world)  # micro-batches per worker in this last step
    mine = len(range(rank, blocks, world))
    tail = ([held] if held is not None else []) + [None] * (slots - mine)
    for i, batch in enumerate(tail):
        yield batch, 0 if i == len(tail) - 1 else None, blocks


def _flag_last(stream):
    """(position, item, whether it is the stream's last) for each item."""
    it = iter(stream)
    try:
        item = next(it)
    except StopIteration:
        return
    position = 0
    for following in it:
        yield position, item, False
        item, position = following, position + 1
    yield position, item, True


def _dummy_batch(tokenizer, image_size: int) -> list:
    """One tiny sample with an image, for zero-weight passes (every trainable part in use)."""
    t = tokenizer.eos_token_id
    return [([IMAGE_TOKEN, t], [IGNORE, t], np.zeros((3, image_size, image_size), np.float32))]


def _micro_step(module, batch, device, autocast: bool, weight: float) -> tuple[float, int]:
    ids = [b[0] for b in batch]
    labels = [b[1] for b in batch]
    images = [b[2] for b in batch if b[2] is not None]
    pixels = torch.from_numpy(np.stack(images)).to(device) if images else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = module(ids, labels, pixels)
    (out.loss * weight).backward()
    tokens = sum(sum(1 for x in lab if x != IGNORE) for lab in labels)
    return float(out.loss.detach()) * weight, tokens


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state (weights only: nothing is unpickled); a damaged file is an error
    naming it."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, zeroed or not a checkpoint at all
        raise InputError(
            f"{path}: a damaged checkpoint ({type(exc).__name__}: {str(exc)[:200]}); remove it "
            "to train afresh"
        ) from None
    if not isinstance(state, dict) or "params" not in state:
        raise InputError(f"{path}: not a condense checkpoint")
    return state


def check_resumable(path: Path, state: dict, cfg: LoopConfig) -> None:
    """Refuse to resume a checkpoint made with other settings, naming each difference."""
    made = dict(state.get("settings") or {})
    made.setdefault("global_batch", state.get("global_batch"))
    now = {**cfg.settings, "global_batch": cfg.global_batch}
    differences = [
        f"{key} {made.get(key)!r} (now {now.get(key)!r})"
        for key in sorted(set(made) | set(now))
        if made.get(key) != now.get(key) and (key in made or key == "global_batch")
    ]
    if differences:
        raise InputError(
            f"{path} was made with other settings: {'; '.join(differences)}; resume with the "
            "settings it was made with, or train afresh without --resume"
        )


def load_safetensors(path: Path) -> dict:
    """A safetensors file's tensors; a truncated or damaged file is an error naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file ({str(exc)[:200]})") from None


def load_projector(model: BunnyModel, path: Path) -> None:
    """Stage 1's projector weights into `model` (exact keys, exact shapes)."""
    state = {k.removeprefix("projector."): v for k, v in load_safetensors(path).items()}
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: does not fit this projector ({str(exc)[:300]})") from None


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
