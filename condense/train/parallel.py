"""How the training loop runs across workers: one process (plain PyTorch), DDP or FSDP.

The loop asks a `Parallel` for the module to call, for a context that holds back the gradient
all-reduce on all but the last micro-batch of a step, for sums across workers, and for the
trainable state (checkpoints, outputs). One process needs no torch.distributed at all; DDP and
FSDP need the process group that Ray Train's TorchTrainer (or torchrun) sets up.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Whole tensors, gathered to the CPU (under FSDP only the main worker keeps them).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole tensor: an FSDP shard is gathered (a collective)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class OneProcess:
    """One process: the model as is."""

    rank, world = 0, 1

    def __init__(self, device: torch.device | None = None):
        self.device = device or default_device()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, text_only_batches: bool) -> nn.Module:
        return model

    def no_sync(self, module: nn.Module):
        return nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def state(self, model: nn.Module, opt: torch.optim.Optimizer, names: list[str]):
        """(the named trainable tensors, whole, on the CPU; the optimizer's state keyed by
        parameter name), for a checkpoint. The same layout for every strategy, so a run may
        resume with another one; a collective under FSDP (every worker calls it)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        params = dict(model.named_parameters())
        weights = {n: _whole(params[n]).detach().cpu() for n in names}
        return weights, get_optimizer_state_dict(model, opt, options=_full_options())

    def load_state(self, model, opt, params: dict, opt_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, params, options=options)
        set_optimizer_state_dict(model, opt, optim_state_dict=opt_state, options=options)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the main process (None elsewhere), for the outputs."""
        return None  # the model itself holds them: nothing to gather


class DDP(OneProcess):
    """Data parallel: every worker holds the model; gradients are averaged once per step."""

    def __init__(self, device: torch.device | None = None):
        import torch.distributed as dist

        super().__init__(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def wrap(self, model, text_only_batches):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A text-only batch leaves the projector (and an unfrozen vision tower) out of the
        # graph; DDP then has to look for unused parameters.
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=text_only_batches
        )

    def no_sync(self, module):
        return module.no_sync()

    def sum(self, values):
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


class FSDP(DDP):
    """Fully sharded (FSDP2 `fully_shard`): each decoder layer, the vision tower, the projector
    and the whole model are sharded units, so no worker holds more than its share of the
    weights, gradients and optimizer state outside the layer it is computing."""

    def wrap(self, model, text_only_batches):
        from torch.distributed.fsdp import fully_shard

        from condense.train.model import decoder_layers

        for layer in decoder_layers(model.llm):
            fully_shard(layer)
        fully_shard(model.vision)
        fully_shard(model.projector)
        fully_shard(model)
        model.always_run_vision = True  # text-only batches too: the same collectives everywhere
        return model

    @contextmanager
    def no_sync(self, module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())


def make_parallel(strategy: str = "ddp", device: torch.device | None = None) -> OneProcess:
    """`OneProcess` outside a process group; else the strategy's class on `device` (this worker's
    GPU, or the CPU)."""
    import torch.distributed as dist

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not (dist.is_available() and dist.is_initialized()):
        return OneProcess(device)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return (DDP if strategy == "ddp" else FSDP)(device)
