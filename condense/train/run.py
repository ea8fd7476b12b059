"""`condense train stage1|stage2`: the Bunny recipe's two stages on a run, saved in RUN/train/.

Stage 1 trains the projector on the run's exported coreset shards; stage 2 starts from that
projector and trains LoRA adapters (and the projector) on instruction data (a LLaVA JSON).
On a CPU, after `condense demo`, in seconds:

    condense train stage1 configs/train/stage1-tiny.yaml --run-dir runs/demo
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from condense.errors import CondenseError, ConfigError, InputError
from condense.storage.files import atomic_write_bytes, atomic_write_json, read_json
from condense.train.config import TrainConfig


def build_model(cfg: TrainConfig):
    """(BunnyModel, tokenizer) from the config's registries and paths."""
    from condense.train.model import PROJECTORS, VISION_TOWERS, BunnyModel, build_llm, pick
    from condense.train.tokenizers import load_tokenizer

    try:
        vision_builder = pick(VISION_TOWERS, cfg.vision.name, "vision tower")
        projector_builder = pick(PROJECTORS, cfg.projector, "projector")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (cfg.llm.path or cfg.llm.config):
        raise ConfigError("llm.path or llm.config is required")
    import torch

    # Components built from a config get random weights: drawn from the config's seed, so that
    # training and `condense chat` (which saves no frozen weights) build the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vision = vision_builder(
            path=cfg.vision.path,
            config=cfg.vision.config,
            layer=cfg.vision.layer,
            model=cfg.vision.model,
        )
        llm = build_llm(cfg.llm.path, cfg.llm.config, cfg.llm.gguf_file, cfg.llm.attention)
        projector = projector_builder(vision.hidden_size, llm.config.hidden_size)
    tokenizer = load_tokenizer(cfg.llm.tokenizer or cfg.llm.path, cfg.llm.gguf_file)
    return BunnyModel(vision, projector, llm), tokenizer


def shard_files(cfg: TrainConfig, run_dir: Path) -> list[Path]:
    """The WebDataset shards stage 1 reads: data.shards (a folder, or a URL such as
    s3://bucket/run/export/shards: the shards stream from the store), else RUN/export/shards."""
    from condense.stages.export import SHARDS_DIR, ExportStage
    from condense.storage.fs import location

    default = run_dir / ExportStage.name / SHARDS_DIR
    folder = location(cfg.data.shards) if cfg.data.shards else default
    shards = sorted(folder.glob("*.tar"), key=str) if folder.exists() else []
    if not shards:
        raise InputError(
            f"{folder}: no WebDataset shards; run the pipeline (its export stage) first, "
            "or set data.shards or data.llava_json"
        )
    return shards


def stage_samples(cfg: TrainConfig, run_dir: Path, skipped: Counter):
    """(a callable giving one epoch's samples, their count) from the shards or a JSON. The
    callable takes a worker's share (`train`): shard images outside it are not read; a JSON's
    images are files each worker opens only for its own samples anyway."""
    from condense.train.data import json_samples, shard_samples

    if cfg.data.llava_json:
        data = list(json_samples(Path(cfg.data.llava_json), cfg.data.image_folder, skipped))
        return (lambda wanted=None: data), len(data)
    shards = shard_files(cfg, run_dir)
    stats = [
        json.loads(p.read_text()).get("count", 0) for p in shards[0].parent.glob("*_stats.json")
    ]  # img2dataset's counts: no shard is read twice to count it
    total = (
        sum(stats)
        if len(stats) == len(shards)
        else sum(1 for _ in shard_samples(shards, Counter(), cfg.data.limits, _no_images))
    )
    return (lambda wanted=None: shard_samples(shards, skipped, cfg.data.limits, wanted)), total


def _no_images(_position: int) -> bool:
    return False  # counting samples reads no image


def projector_start(cfg: TrainConfig, run_dir: Path) -> Path:
    """Where stage 2's projector comes from: projector_from, else stage 1's output."""
    from condense.train.loop import PROJECTOR_FILE

    return Path(cfg.projector_from or run_dir / "train" / "stage1" / PROJECTOR_FILE)


def check_inputs(cfg: TrainConfig, run_dir: Path) -> None:
    """What can be checked before any worker starts: settings, and that the inputs exist."""
    if cfg.global_batch % (cfg.per_device_batch * cfg.workers):
        raise ConfigError(
            f"global_batch {cfg.global_batch} is not a multiple of per_device_batch "
            f"{cfg.per_device_batch} x {cfg.workers} worker(s)"
        )
    if cfg.stage == "stage2":
        if not cfg.data.llava_json:
            raise ConfigError("stage 2 trains on instruction data: set data.llava_json")
        start = projector_start(cfg, run_dir)
        if not start.is_file():
            raise InputError(f"stage 2 starts from stage 1's projector: {start} does not exist")
    if cfg.data.llava_json:
        if not Path(cfg.data.llava_json).is_file():
            raise InputError(f"data.llava_json: {cfg.data.llava_json} does not exist")
    else:
        shard_files(cfg, run_dir)


def train_stage(cfg: TrainConfig, run_dir: str | Path, log=print, resume: bool = False) -> dict:
    """Stage 1: train the projector (vision tower and LLM frozen). Stage 2: LoRA adapters and
    the projector, from stage 1's projector, on a LLaVA JSON. Outputs go to RUN/train/<stage>/.

    One worker runs here, in plain PyTorch. `workers` > 1 runs a Ray Train TorchTrainer (DDP,
    or FSDP with `strategy: fsdp`) on the Ray cluster this process joins."""
    from condense.storage.fs import is_url
    from condense.storage.rundir import RunLock

    if is_url(run_dir):
        raise ConfigError(
            f"--run-dir {run_dir}: the trainer writes checkpoints and weights to a local or "
            "shared folder; keep the coreset in the store and point at it with "
            "--set data.shards=<run>/export/shards and a local --run-dir"
        )
    check_inputs(cfg, Path(run_dir))
    with RunLock(run_dir, log):  # one driver per run directory, the pipeline's or a trainer's
        if cfg.workers > 1:
            return train_on_ray(cfg, run_dir, log, resume)
        from condense.train.parallel import make_parallel

        return train_worker(cfg, Path(run_dir), log, resume, make_parallel(cfg.strategy))


def train_on_ray(cfg: TrainConfig, run_dir: str | Path, log=print, resume: bool = False) -> dict:
    """The stage on `cfg.workers` Ray Train workers; returns the trainer state they saved."""
    from condense import faults
    from condense.runtime.train import cluster_has_gpus, fit

    gpus = cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpus()
    run_dir = Path(run_dir).resolve()
    if not resume:  # a checkpoint the workers find is then this run's (after a restart)
        shutil.rmtree(checkpoint_dir(cfg, run_dir), ignore_errors=True)
    settings = _absolute_paths(cfg.model_dump())  # Ray Train workers run in folders of their own
    config = {
        "cfg": settings,
        "run_dir": str(run_dir),
        "resume": resume,
        "failpoints": faults.env(),
    }
    log(
        f"[train] {cfg.stage} on {cfg.workers} Ray Train workers "
        f"({cfg.strategy}, {'GPU' if gpus else 'CPU'})"
    )
    out = run_dir / "train" / cfg.stage
    for stale in out.glob(WORKER_ERRORS):
        stale.unlink()
    try:
        fit(
            _ray_worker,
            config,
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            use_gpu=gpus,
            storage=run_dir / "train" / "ray",
            name=f"condense-{cfg.stage}",
            max_failures=cfg.max_failures,
        )
    except Exception:
        _raise_worker_error(out)  # bad input seen by a worker, rather than Ray's account of it
        raise
    _raise_worker_error(out)
    # The main worker wrote it (the run directory is on storage every node sees).
    return json.loads((run_dir / "train" / cfg.stage / TRAINER_STATE).read_text())


def _absolute_paths(settings: dict) -> dict:
    """The config's file and folder settings made absolute (package: and bytes left as is)."""

    def fix(value):
        if not value or value == "bytes" or value.startswith("package:"):
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value  # a model name stays a name

    data, vision, llm = settings["data"], settings["vision"], settings["llm"]
    for section, keys in (
        (data, ("shards", "llava_json", "image_folder")),
        (vision, ("path", "model")),
        (llm, ("path", "tokenizer")),
        (settings, ("projector_from",)),
    ):
        for key in keys:
            section[key] = fix(section[key])
    return settings


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the same run as one process, in the process group Ray set up.

    The driver removed any checkpoint of an earlier run (unless resuming it), so a checkpoint
    found here is this run's: Ray Train restarted the workers after one died, and they go on
    from it."""
    import os

    from condense.runtime.train import worker_device
    from condense.train.loop import CHECKPOINT
    from condense.train.parallel import make_parallel

    os.environ.update(config["failpoints"])  # a test's failpoints (condense/faults.py)
    cfg = TrainConfig(**config["cfg"])
    run_dir = Path(config["run_dir"])
    out = run_dir / "train" / cfg.stage
    if any(out.glob(WORKER_ERRORS)):  # an earlier attempt stopped on bad input: so would this
        return
    restarted = (checkpoint_dir(cfg, run_dir) / CHECKPOINT).exists()
    parallel = make_parallel(cfg.strategy, worker_device())
    try:
        train_worker(cfg, run_dir, print, config["resume"] or restarted, parallel)
    except CondenseError as exc:
        # Bad input fails the same way on every restart: report it to the driver and end this
        # worker cleanly (Ray Train's restarts are for workers that die). A worker alone with
        # it leaves its peers in a collective; their failure and restarts end at the check
        # above, and the driver reports this message.
        atomic_write_json(out / f"worker_error-{parallel.rank}.json", {"message": str(exc)})


TRAINER_STATE = "trainer_state.json"  # a stage's counts and losses, in RUN/train/<stage>/
WORKER_ERRORS = "worker_error-*.json"  # what each Ray Train worker stopped on, for the driver


def _raise_worker_error(folder: Path) -> None:
    """The bad-input error a worker reported (the lowest rank's), as in one process."""
    for path in sorted(folder.glob(WORKER_ERRORS)):
        error = read_json(path)
        if error is not None:
            raise InputError(error["message"])


def checkpoint_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(run_dir) / "train" / cfg.stage / "checkpoint"


def resume_settings(cfg: TrainConfig, run_dir: Path) -> dict:
    """What a checkpoint must have been made with to be resumed: every setting that decides
    the result (not worker counts or logging), and the data's identity (files, sizes, times)."""
    from fsspec.core import url_to_fs

    from condense.storage.files import content_digest

    settings = _absolute_paths(cfg.fingerprint_dict())  # the same here and in Ray workers
    files = [Path(cfg.data.llava_json)] if cfg.data.llava_json else shard_files(cfg, run_dir)
    identity = []
    for path in files:
        fs, name = url_to_fs(str(path))
        info = fs.info(name)
        identity.append((path.name, info.get("size"), content_digest(fs, name, info["size"], info)))
    settings["data_files"] = identity
    return json.loads(json.dumps(settings, default=str))


def train_worker(cfg: TrainConfig, run_dir: Path, log, resume: bool, parallel) -> dict:
    """Build, train and (on the main worker) save one stage; every worker runs this."""
    import yaml

    from condense.train.loop import Checkpointer, load_projector, save_projector, train

    model, tokenizer = build_model(cfg)
    skipped: Counter = Counter()
    checkpointer = Checkpointer(checkpoint_dir(cfg, run_dir), resume_settings(cfg, run_dir), resume)
    if cfg.stage == "stage2":
        start = projector_start(cfg, run_dir)
        load_projector(model, start)
        if parallel.is_main:
            log(f"[train] stage 2 starts from the projector in {start}")
    samples, total = stage_samples(cfg, run_dir, skipped)
    if parallel.is_main:
        log(f"[train] {cfg.stage} on {total:,} samples, global batch {cfg.global_batch}")
    try:
        result = train(
            model,
            samples,
            total,
            tokenizer,
            model.vision.image_size,
            cfg,
            log,
            parallel,
            checkpointer,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    full = parallel.full_state_dict(model)  # FSDP: the shards gathered (a collective)
    if not result.samples:
        reasons = ", ".join(
            f"{k}={v}" for k, v in sorted((skipped + Counter(result.skipped)).items())
        )
        raise InputError(f"no sample could be used ({reasons or 'no samples'})")
    skipped.update(result.skipped)  # data-level skips (every worker reads, and counts, them all)
    out = run_dir / "train" / cfg.stage
    state = {
        "steps": result.steps,
        "samples": result.samples,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "trainable_parameters": result.trainable,
        "workers": parallel.world,
        "resumed_at_step": result.resumed_at,
        "losses": result.losses,
        "skipped": dict(skipped),
    }
    if not parallel.is_main:
        return state
    if full is not None:  # an unsharded copy to save from
        model = _unsharded(cfg, full)
    save_projector(model, out)
    if cfg.stage == "stage2":
        model.llm.save_pretrained(out / "adapter")  # the peft adapter (Hugging Face layout)
        if cfg.merge:  # a plain Hugging Face model: the adapter folded into the weights
            model.llm.merge_and_unload().save_pretrained(out / "merged")
            log(f"[train] merged LLM in {out / 'merged'}")
        if cfg.unfreeze_vision:
            from safetensors.torch import save_file

            state_dict = model.vision.state_dict()
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                str(out / "vision_tower.safetensors"),
            )
    atomic_write_json(out / TRAINER_STATE, state)
    atomic_write_bytes(
        out / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode()
    )
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (0.0, 0.0)
    log(
        f"[train] {cfg.stage} done: {result.steps} steps, {result.samples:,} samples, loss "
        f"{first:.3f} -> {last:.3f}, {state['tokens_per_second']:,.0f} tokens/s; outputs in {out}"
    )
    return state


def _unsharded(cfg: TrainConfig, full: dict):
    """A plain model in the trained layout (peft-wrapped in stage 2) holding `full`."""
    from condense.train.loop import prepare_stage2

    model, _ = build_model(cfg)
    if cfg.stage == "stage2":
        prepare_stage2(model, cfg)
    model.load_state_dict(full, strict=True)
    return model
