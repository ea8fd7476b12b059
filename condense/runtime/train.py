"""Ray Train: one training function on several workers, in the process group Ray Train sets
up (NCCL on GPUs, gloo on CPUs), restarted from the last checkpoint when a worker dies. The
trainer (`condense/train/`) hands its function here; it never imports Ray itself.

    fit(worker_fn, {"cfg": ...}, workers=2, cpus_per_worker=1, use_gpu=False,
        storage=RUN / "train" / "ray", name="condense-stage1", max_failures=2)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def cluster_has_gpus(cfg=None) -> bool:
    """Whether the Ray cluster this process joins (or starts) has a GPU."""
    from condense.runtime import RayConfig
    from condense.runtime.ray import cluster_resources, init_ray

    init_ray(cfg or RayConfig())
    return cluster_resources()["GPU"] >= 1


def fit(
    worker: Callable[[dict], None],
    config: dict,
    *,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    storage: Path,
    name: str,
    max_failures: int,
) -> None:
    """Run `worker(config)` on `workers` Ray Train workers until it returns on all of them."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from condense.runtime import RayConfig
    from condense.runtime.ray import init_ray

    init_ray(RayConfig())
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures)
        ),
    )
    trainer.fit()


def worker_device():
    """The torch device Ray Train gave this worker."""
    import ray.train.torch

    return ray.train.torch.get_device()
