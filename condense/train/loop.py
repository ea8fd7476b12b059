"""One worker's training loop (plain PyTorch, no Ray): stage 1 trains the projector only;
stage 2 trains LoRA adapters on the LLM's linear layers (lm_head excepted) and the projector
at its own rate (and the vision tower, when unfrozen).

Batches of `per_device_batch` samples; gradients accumulate to `global_batch`; AdamW with a
cosine schedule after a linear warmup; bf16 autocast on GPUs that have it. Samples that cannot
be used (an image that does not decode, text past max_length: truncated) are counted, never
raised mid-epoch. `train` reads top to bottom; the pieces it calls, in order, are
`prepare_model`, `prepare_sample`, `micro_step`, `optimizer_step`, `Checkpointer` and
`StepLog`.

    model, tokenizer = build_model(cfg)          # condense/train/run.py
    result = train(model, lambda: samples, len(samples), tokenizer, 32, cfg)
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from condense.errors import InputError
from condense.faults import kill_once
from condense.storage.files import atomic_file
from condense.train.config import TrainConfig
from condense.train.data import load_image
from condense.train.model import BunnyModel, base_llm
from condense.train.parallel import OneProcess
from condense.train.templates import IGNORE, IMAGE_TOKEN, encode

CHECKPOINT = "checkpoint.pt"
PROJECTOR_FILE = "mm_projector.safetensors"  # a stage's projector (Hugging Face's name)


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


def prepare_stage2(model: BunnyModel, cfg: TrainConfig) -> list[dict]:
    """LoRA (peft) on every linear layer of the LLM but lm_head, its base weights frozen; the
    projector trains at mm_projector_lr, the vision tower too when unfrozen. Returns the
    optimizer's parameter groups."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
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


@dataclass
class Trainable:
    """What the optimizer steps, after the model is prepared for its stage."""

    module: torch.nn.Module  # what the loop calls: the model, or its DDP/FSDP wrapper
    groups: list[dict]  # the optimizer's parameter groups
    names: list[str]  # the trainable parameters' names (checkpoints are keyed by them)
    image_params: list[torch.Tensor]  # the image side's (projector, vision tower)
    count: int  # trainable parameters

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]


def prepare_model(model: BunnyModel, cfg: TrainConfig, parallel, log) -> Trainable:
    """Freeze or adapt the model for its stage, wrap it for the workers, seed each worker."""
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every worker
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
        checkpoint_activations(base_llm(model.llm))
    count = sum(p.numel() for g in groups for p in g["params"])
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in g["params"]] for g in groups]
    # Stage 2 has text-only samples: the projector may be left out of a batch's graph.
    module = parallel.wrap(model, text_only_batches=cfg.stage == "stage2")
    if cfg.compile:
        compile_layers(model)
    own = dict(model.named_parameters())  # FSDP has replaced them with sharded ones
    groups = [{**g, "params": [own[n] for n in ns]} for g, ns in zip(groups, names, strict=True)]
    torch.manual_seed(cfg.seed + parallel.rank)  # and each its own LoRA dropout
    flat = [n for ns in names for n in ns]
    image_params = [own[n] for n in flat if n.startswith(("projector.", "vision."))]
    log(f"[train] {cfg.stage}: {count:,} trainable parameters ({what})")
    return Trainable(module, groups, flat, image_params, count)


def prepare_sample(cfg: TrainConfig, tokenizer, image_size: int, mean, std, skipped, sample):
    """(ids, labels, pixels) of one sample, or None (counted in `skipped` by reason)."""
    turns, image = sample
    if image is None and cfg.stage == "stage1":
        skipped["no_image"] += 1  # nothing for the projector to learn from
        return None
    pix = load_image(image, image_size, skipped, mean, std, cfg.data.limits)
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


@dataclass
class StepWindow:
    """This worker's sums over the optimizer step being accumulated."""

    loss: float = 0.0
    tokens: int = 0
    samples: int = 0
    images: int = 0

    def add(self, batch: list, loss: float, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens
        self.samples += len(batch)
        self.images += sum(1 for b in batch if b[2] is not None)

    def clear(self) -> None:
        self.loss, self.tokens, self.samples, self.images = 0.0, 0, 0, 0


class Loader:
    """This worker's samples decoded and tokenised (`prepare_sample`): in this process, or with
    `loader_workers`, ahead of the loop in that many worker processes, so the accelerator does
    not wait for images. Items come back in the stream's order, whatever the workers' speed,
    and their skip counts are added here: the batches and counts are the same either way."""

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, vision, skipped):
        mean, std = getattr(vision, "mean", None), getattr(vision, "std", None)
        self.args = (cfg, tokenizer, image_size, mean, std)
        self.cfg, self.skipped, self.pool = cfg, skipped, None
        self.depth = max(4 * cfg.loader_workers, 2 * cfg.per_device_batch)  # items ahead
        if cfg.loader_workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Spawned, not forked: the parent may hold CUDA and the process group's threads.
            self.pool = ProcessPoolExecutor(
                cfg.loader_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_loader_init,
                initargs=self.args,
            )

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def micro_batches(self, samples, skip: int, parallel):
        """This worker's micro-batches of one epoch from stream position `skip`, as
        `_micro_batches` deals them; with several workers, `samples` is asked for this
        worker's share only."""
        span, size = self.cfg.global_batch, self.cfg.per_device_batch
        share = partial(_is_mine, skip, span, size, parallel.rank, parallel.world)
        stream = samples(share) if parallel.world > 1 else samples()
        return _micro_batches(self.ahead(stream, share), skip, span, size, parallel, self.take)

    def ahead(self, stream, wanted):
        """The stream, this worker's samples (wanted(position)) handed to the pool early."""
        if self.pool is None:
            yield from stream
            return
        from collections import deque

        queue: deque = deque()  # futures of this worker's samples, None for the others'
        pending = 0  # futures in the queue: the stream runs ahead until `depth` are in flight
        for position, sample in enumerate(stream):
            if wanted(position):
                queue.append(self.pool.submit(_loader_prepare, sample))
                pending += 1
            else:
                queue.append(None)
            while queue and (queue[0] is None or pending > self.depth):
                item = queue.popleft()
                pending -= item is not None
                yield item
        while queue:
            yield queue.popleft()

    def take(self, sample):
        """A sample's (ids, labels, pixels), or None (counted): prepared here, or the pool's."""
        if self.pool is None:
            return prepare_sample(*self.args, self.skipped, sample)
        item, counts = sample.result()
        self.skipped.update(counts)
        return item

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


_LOADER_ARGS: tuple = ()  # a loader worker process's prepare_sample arguments


def _loader_init(*args) -> None:
    global _LOADER_ARGS
    _LOADER_ARGS = args
    torch.set_num_threads(1)  # decoding is per sample: one thread each, the workers side by side


def _loader_prepare(sample):
    counts: Counter = Counter()
    return prepare_sample(*_LOADER_ARGS, counts, sample), dict(counts)


def micro_step(module, batch, window: StepWindow, parallel, dummy, autocast, last, weight):
    """Forward and backward of one micro-batch, its mean loss weighted by 1 / the
    micro-batches per worker in a step (DDP and FSDP then average over the workers: the
    step's gradient is the mean over its micro-batches; a short last step is scaled up
    before the optimizer steps). Gradients are all-reduced on the last micro-batch of a
    step. An empty one (its samples all skipped, or past the stream's end on this worker)
    runs a zero-weight pass, so every worker joins every all-reduce."""
    if not batch and parallel.world == 1:
        return
    with nullcontext() if last else parallel.no_sync(module):
        loss, tokens = _forward_backward(
            module, batch or dummy, parallel.device, autocast, weight * bool(batch)
        )
    if batch:
        window.add(batch, loss, tokens)


def optimizer_step(trainable: Trainable, opt, sched, window: StepWindow, result, parallel):
    """One optimizer step on the accumulated gradients; the step's sums go into `result`."""
    loss, tokens, count, images = parallel.sum(
        [window.loss, window.tokens, window.samples, window.images]
    )
    # What one process would leave without a gradient (None: AdamW leaves it alone, no
    # momentum step) stays so: everything in a step with no sample, the image side
    # (projector, vision tower) in a step without images; zero-weight passes gave zeros.
    unused = trainable.params if not count else trainable.image_params if not images else []
    for p in unused:
        p.grad = None
    torch.nn.utils.clip_grad_norm_(trainable.params, 1.0)  # DTensor-aware under FSDP
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    result.steps += 1
    result.losses.append(loss / parallel.world)
    result.tokens += int(tokens)
    result.samples += int(count)
    window.clear()


class Checkpointer:
    """Trainable weights, optimizer, scheduler, RNG and the data position in
    `folder/checkpoint.pt`, written atomically; `resume` continues from it. A checkpoint made
    with other `settings` (the run's settings and data identity) is refused by name."""

    def __init__(self, folder: Path, settings: dict | None = None, resume: bool = False):
        self.path = Path(folder) / CHECKPOINT
        self.settings, self.resume = settings or {}, resume

    def save(self, ctx: dict, result: LoopResult, skipped: Counter, epoch: int, position: int):
        parallel = ctx["parallel"]
        weights, opt_state = parallel.state(ctx["model"], ctx["opt"], ctx["names"])
        rng = parallel.gather(_rng_state(parallel.device))
        counts = parallel.gather(dict(skipped))
        if not parallel.is_main:
            return
        state = {
            "settings": self.settings,
            "params": weights,
            "optimizer": opt_state,
            "scheduler": ctx["sched"].state_dict(),
            "rng": rng,
            "epoch": epoch,
            "position": position,
            "global_batch": ctx["global_batch"],
            "steps": result.steps,
            "losses": result.losses,
            "samples": result.samples,
            "tokens": result.tokens,
            "skipped": dict(sum((Counter(c) for c in counts), Counter())),
        }
        with atomic_file(self.path) as f:  # a unique temporary name, fsynced, then renamed
            torch.save(state, f)

    def restore(self, ctx: dict, result: LoopResult, skipped: Counter, log) -> tuple[int, int]:
        """(epoch, position) to go on from: (0, 0) without a checkpoint to resume."""
        if not (self.resume and self.path.exists()):
            return 0, 0
        parallel = ctx["parallel"]
        state = load_checkpoint(self.path)
        check_resumable(self.path, state, self.settings, ctx["global_batch"])
        parallel.load_state(ctx["model"], ctx["opt"], state["params"], state["optimizer"])
        ctx["sched"].load_state_dict(state["scheduler"])
        rng = state["rng"]  # each worker its own draws; with another worker count, derived ones
        if len(rng) == parallel.world:
            _set_rng_state(rng[parallel.rank], parallel.device)
        else:
            torch.manual_seed(ctx["seed"] + parallel.rank + 1000 * state["steps"])
        result.steps, result.losses = state["steps"], list(state["losses"])
        result.samples, result.tokens = state["samples"], state["tokens"]
        result.resumed_at = state["steps"]
        if parallel.is_main:  # the counts of all workers, summed once
            skipped.update(state["skipped"])
        epoch, position = state["epoch"], state["position"]
        log(f"[train] resuming at step {result.steps} (epoch {epoch + 1}, sample {position})")
        return epoch, position


class StepLog:
    """Loss, tokens/s and time left: a live bar on a terminal, else a line every `every` steps
    (and at the last step), for logs such as `ray job logs`."""

    def __init__(self, stage: str, total: int, every: int, result: LoopResult, parallel, log):
        self.total, self.every, self.log = total, every, log
        self.first_step, self.first_tokens = result.steps, result.tokens  # this run's share
        self.start = time.perf_counter()
        self.bar = None
        if parallel.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=result.steps, desc=stage, unit="step")

    def step(self, result: LoopResult) -> None:
        elapsed = time.perf_counter() - self.start
        done = result.steps - self.first_step
        left = elapsed / done * (self.total - result.steps) if done else 0.0
        rate = (result.tokens - self.first_tokens) / max(elapsed, 1e-9)
        text = f"loss {result.losses[-1]:.4f} | {rate:,.0f} tokens/s | {left:,.0f} s left"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text)
        elif result.steps % self.every == 0 or result.steps == self.total:
            self.log(f"[train] step {result.steps}/{self.total}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    model: BunnyModel,
    samples: Callable[[], Iterable[tuple[list[dict], bytes | Path | None]]],
    n_samples: int,
    tokenizer,
    image_size: int,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    parallel: OneProcess | None = None,
    checkpointer: Checkpointer | None = None,
) -> LoopResult:
    """Train `model` on `samples` (one epoch's stream, the same on every worker).

    Each optimizer step takes the next `global_batch` samples of the stream in blocks of
    `per_device_batch`; block j goes to worker j % world, so any number of workers sees the
    same steps as one (the global batch is a multiple of per_device_batch x workers). Each
    micro-batch's mean loss is divided by the micro-batches per worker per step, and DDP/FSDP
    average the gradients over the workers: the gradient one worker would compute.

    With several workers `samples` is called with this worker's share, `wanted(position)`: a
    stream may leave the images of the samples outside it unread (shard_samples does), as
    no worker uses them.
    """
    parallel = parallel or OneProcess()
    log = log if parallel.is_main else _silent
    if cfg.global_batch % (cfg.per_device_batch * parallel.world):
        raise ValueError(
            f"global_batch {cfg.global_batch} is not a multiple of per_device_batch "
            f"{cfg.per_device_batch} x {parallel.world} worker(s)"
        )
    trainable = prepare_model(model, cfg, parallel, log)
    full = cfg.global_batch // cfg.per_device_batch  # blocks (micro-batches) in a whole step
    total = max(1, math.ceil(n_samples / cfg.global_batch)) * cfg.epochs
    opt, sched = make_optimizer(trainable, cfg, total)
    autocast = parallel.device.type == "cuda" and torch.cuda.is_bf16_supported()
    result = LoopResult(steps=0, trainable=trainable.count)
    skipped: Counter = Counter()
    window = StepWindow()
    dummy = _dummy_batch(tokenizer, image_size)
    state = {"parallel": parallel, "model": model, "opt": opt, "sched": sched}  # checkpointed
    state.update(names=trainable.names, global_batch=cfg.global_batch, seed=cfg.seed)
    start = time.perf_counter()
    first_epoch, skip = (
        checkpointer.restore(state, result, skipped, log) if checkpointer else (0, 0)
    )
    first_tokens = result.tokens
    progress = StepLog(cfg.stage, total, cfg.log_every, result, parallel, log)

    def stop() -> bool:
        return cfg.max_steps is not None and result.steps >= cfg.max_steps

    with Loader(cfg, tokenizer, image_size, model.vision, skipped) as loader:
        for epoch in range(first_epoch, cfg.epochs):
            stream = loader.micro_batches(samples, skip, parallel)
            skip = 0
            for batch, end, count in stream:
                last, weight = end is not None, parallel.world / full
                micro_step(trainable.module, batch, window, parallel, dummy, autocast, last, weight)
                if end is None:
                    continue
                if count < full:  # a short last step: the mean over the blocks it has
                    _scale_gradients(trainable.params, full / count)
                    window.loss *= full / count
                optimizer_step(trainable, opt, sched, window, result, parallel)
                progress.step(result)
                if checkpointer is not None and end == 0:  # the epoch's end
                    checkpointer.save(state, result, skipped, epoch + 1, 0)
                elif checkpointer is not None and (result.steps % cfg.save_every == 0 or stop()):
                    checkpointer.save(state, result, skipped, epoch, end)
                kill_once("train_kill", f"{parallel.rank}-{result.steps}")  # a test's worker killed
                if stop():
                    break
            if stop():
                break
    progress.close()
    return _finish(result, time.perf_counter() - start, first_tokens, skipped, parallel)


def make_optimizer(trainable: Trainable, cfg: TrainConfig, total: int):
    """AdamW over the trainable groups, with a cosine schedule after a linear warmup. On GPUs
    the fused kernel (one launch for every parameter, not a few per tensor); on CPUs the plain
    one, so CPU runs keep their losses bit for bit."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    params = [p for g in trainable.groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(
        trainable.groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total, warmup))


def _finish(result: LoopResult, seconds: float, first_tokens: int, skipped, parallel):
    """The run's time and rate, and every worker's skipped samples summed."""
    result.seconds = seconds
    result.tokens_per_second = (result.tokens - first_tokens) / max(seconds, 1e-9)
    total_skipped = sum((Counter(c) for c in parallel.gather(dict(skipped))), Counter())
    result.skipped = {k: v for k, v in sorted(total_skipped.items()) if v}
    return result


def _silent(_: str) -> None:
    pass


def compile_layers(model: BunnyModel) -> None:
    """torch.compile each decoder layer (sequence lengths vary: dynamic shapes) and the vision
    tower, in place: parameter names, checkpoints and the DDP/FSDP wrappers are unchanged."""
    from condense.train.model import decoder_layers

    for layer in decoder_layers(model.llm):
        layer.compile(dynamic=True)
    model.vision.compile()


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


def _micro_batches(stream, skip: int, span: int, size: int, parallel: OneProcess, prepare):
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
        mine = _is_mine(skip, span, size, rank, world, position)
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


def _is_mine(skip: int, span: int, size: int, rank: int, world: int, position: int) -> bool:
    """Whether the sample at `position` of the stream falls in this worker's blocks (as
    `_micro_batches` deals them)."""
    return position >= skip and (((position - skip) % span) // size) % world == rank


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


def _forward_backward(module, batch, device, autocast: bool, weight: float) -> tuple[float, int]:
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


def check_resumable(path: Path, state: dict, settings: dict, global_batch: int) -> None:
    """Refuse to resume a checkpoint made with other settings, naming each difference."""
    made = dict(state.get("settings") or {})
    made.setdefault("global_batch", state.get("global_batch"))
    now = {**settings, "global_batch": global_batch}
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
    path = folder / PROJECTOR_FILE
    state = {
        f"projector.{k}": v.detach().cpu().contiguous()
        for k, v in model.projector.state_dict().items()
    }
    save_file(state, str(path))
    return path
