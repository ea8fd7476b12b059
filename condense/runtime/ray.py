"""Ray: starting or joining a cluster, and running stage processors on it.

Stages never import Ray. They hand the executor a processor and its work items
(`runtime/processor.py`); `RayExecutor` is the one adapter that turns them into Ray calls: Ray
tasks, or a pool of Ray actors where the processor's resources ask for long-lived workers,
each named after the stage's processor.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from condense import faults
from condense.errors import StageError
from condense.runtime import RayConfig
from condense.runtime.processor import Processor, Resources
from condense.storage import meter
from condense.storage.meter import IOCount


def _fault_env() -> dict:
    """Remote options handing the driver's failpoints (condense/faults.py) on to its workers,
    when it has a spec of its own (a failpoints file its Ray inherited needs nothing)."""
    env = faults.env()
    return {"runtime_env": {"env_vars": env}} if faults.ENV in env else {}


_STARTED_HERE = False  # whether init_ray connected this process (so shutdown_ray may disconnect it)


def init_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join the cluster named by `address`, `ray.address` or RAY_ADDRESS, else start a local Ray.

    Under `ray job submit` RAY_ADDRESS is set, so the job attaches to the cluster it was sent to.
    A local Ray is sized to this machine and keeps its dashboard on 127.0.0.1.
    """
    target = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if not target:
        # Token authentication, as Ray turns it on for a new local cluster anyway, but said
        # here rather than in a warning on every run (set RAY_AUTH_MODE to choose otherwise).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    global _STARTED_HERE
    if ray.is_initialized():
        return
    _STARTED_HERE = True
    # Workers' output and Ray's own messages (a dead worker, raylet state) stay in Ray's log
    # folder unless asked for: condense's progress lines and errors are what a user reads.
    common = {"logging_level": logging.WARNING, "log_to_driver": cfg.verbose}
    if target:
        ray.init(address=target, **common)
    else:
        warning = dashboard_warning(cfg)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        ray.init(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            **common,
        )


def dashboard_warning(cfg: RayConfig) -> str | None:
    """Why a local Ray's dashboard would be exposed, or None when it stays on this machine."""
    import ipaddress

    if not cfg.include_dashboard:
        return None
    try:
        loopback = ipaddress.ip_address(cfg.dashboard_host).is_loopback
    except ValueError:
        loopback = cfg.dashboard_host == "localhost"
    if loopback:
        return None
    return (
        f"ray.dashboard_host {cfg.dashboard_host} exposes the Ray dashboard and its job API, "
        "which runs any code it is sent, to every host that reaches this machine; keep "
        "127.0.0.1 unless the network is yours, and set RAY_AUTH_MODE=token"
    )


def shutdown_ray() -> None:
    """Disconnect from Ray if init_ray connected (stopping a local Ray it started); else leave it."""
    import ray

    global _STARTED_HERE
    if _STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    _STARTED_HERE = False


def cluster_resources() -> dict[str, float]:
    """Total CPUs and GPUs Ray can schedule on."""
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _run_item(processor_ref: list, index: int, item: Any) -> tuple[int, Any, str, IOCount]:
    """One item as a Ray task: the processor (fetched once per worker process), set up, run;
    with the bytes it moved through the storage layer."""
    before = meter.snapshot()
    result = _fetch(processor_ref[0]).process(item)
    return index, result, _node_id(), meter.snapshot() - before


_TASK_PROCESSORS: dict[Any, Any] = {}  # processors a task worker has set up, by object ref


def _fetch(ref) -> Any:
    """The processor behind `ref`, set up once in this worker process (workers are reused)."""
    import ray

    key = ref.hex()
    if key not in _TASK_PROCESSORS:
        _TASK_PROCESSORS.clear()  # a new map: the last one's processor is done with
        processor = ray.get(ref)
        processor.setup()
        _TASK_PROCESSORS[key] = processor
    return _TASK_PROCESSORS[key]


class _Worker:
    """A long-lived worker: sets its processor up once, then runs it item after item. Each call carries the processor's reference (inside a list, so Ray
    hands it over as is); the first call fetches and sets it up. A restarted actor does the
    same on its retried call, with nothing of it kept in a constructor argument, which Ray
    could not restore (ray-project/ray#53727)."""

    def process(self, processor_ref: list, index: int, item: Any) -> tuple[int, Any, str, IOCount]:
        return _run_item(processor_ref, index, item)


def _stop(running: list, actors: list) -> None:
    """Cancel what is still running and kill the actors."""
    import contextlib

    import ray

    # Not forced: a cancelled task unwinds (a decoder clears its poison mark: a cancel is no
    # death), and what has not started is dropped from the queue.
    for ref in running:
        with contextlib.suppress(Exception):  # finished already: nothing to cancel
            ray.cancel(ref)
    for actor in actors:
        ray.kill(actor)


def _named(cls: type, label: str) -> type:
    """`cls` under the processor's label, which Ray shows for its actors (dashboard, ps)."""
    return type(label, (cls,), {"__qualname__": label, "__module__": __name__})


class RayExecutor:
    """Runs processors over work items on the Ray cluster this process is attached to."""

    name = "ray"

    def __init__(self) -> None:
        self._remote: dict[tuple, Any] = {}  # remote functions, registered once each
        self._io = IOCount()  # what the workers metered, summed over every item so far

    def worker_io(self) -> IOCount:
        """Bytes the workers moved through the storage layer, over every item run so far."""
        return self._io

    def cpus(self) -> int:
        return max(1, int(cluster_resources()["CPU"]))

    def gpus(self) -> int:
        return int(cluster_resources()["GPU"])

    def _pool_size(self, processor: Processor, n: int) -> int:
        """Workers at once: never more than the items, the setting, or the cluster holds. A
        worker the cluster cannot hold at all is an error now, not a task that waits forever."""
        res = processor.resources
        fits_cpu = int(self.cpus() // res.cpus) if res.cpus else n
        fits_gpu = int(self.gpus() // res.gpus) if res.gpus else n
        if not (fits_cpu and fits_gpu):
            raise StageError(
                f"{processor.label} asks for {res.cpus:g} CPUs and {res.gpus:g} GPUs per worker; "
                f"the Ray cluster has {self.cpus()} CPUs and {self.gpus()} GPUs"
            )
        return max(1, min(res.workers or n, n, fits_cpu, fits_gpu))

    def map(self, processor: Processor, items: list) -> Iterator[tuple[Any, Any, str]]:
        """(item, result, node) for every item, in completion order.

        Without `resources.actor`, each item is one Ray task; task workers are reused and set
        the processor up once each. With it, a pool of actors sets it up once per actor (a
        model or a GPU index). The processor goes to the object store once either way, and at
        most `pool size` items are in flight. On an error, or when the caller stops early,
        the items in flight are cancelled and the actors killed."""
        if not items:
            return
        import ray

        res = processor.resources
        pool_size = self._pool_size(processor, len(items))
        ref = [ray.put(processor)]
        actors: list = []
        pending: dict = {}  # result ref -> the slot that runs it
        try:
            if res.actor:
                actors = self._actors(processor, pool_size)
                submit = [lambda i, item, a=a: a.process.remote(ref, i, item) for a in actors]
            else:
                task = self._task(_run_item, processor.label, res)
                submit = [lambda i, item: task.remote(ref, i, item)] * pool_size
            queue = iter(enumerate(items))
            free = list(range(pool_size))
            while True:
                while free:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    slot = free.pop()
                    pending[submit[slot](*nxt)] = slot
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
                free.append(pending.pop(done[0]))
                index, result, node, io = ray.get(done[0])
                self._io += io
                yield items[index], result, node
        finally:
            _stop(list(pending), actors)

    @contextmanager
    def pool(self, processor: Processor, workers: int) -> Iterator[RayPool]:
        """`workers` actors of `processor` (its resources each), killed when the pool closes."""
        import ray

        if self._pool_size(processor, workers) < workers:  # never a pool that waits forever
            res = processor.resources
            raise StageError(
                f"{processor.label}: {workers} workers of {res.cpus:g} CPUs and {res.gpus:g} "
                f"GPUs each do not fit the Ray cluster's {self.cpus()} CPUs and {self.gpus()} GPUs"
            )
        actors = self._actors(processor, workers)
        try:
            yield RayPool(self, [ray.put(processor)], actors)
        finally:
            _stop([], actors)

    def _actors(self, processor: Processor, n: int) -> list:
        """n actors of `processor`, each restarted (and its item retried) `retries` times;
        returned once every one has started, so the CPUs and GPUs they hold are theirs."""
        import ray

        res = processor.resources
        cls = ray.remote(
            num_cpus=res.cpus,
            num_gpus=res.gpus,
            max_restarts=res.retries,
            max_task_retries=res.retries,
            **({"memory": res.memory} if res.memory else {}),
            **_fault_env(),
        )(_named(_Worker, processor.label))
        actors = [cls.remote() for _ in range(n)]
        try:
            ray.get([a.__ray_ready__.remote() for a in actors])
        except BaseException:
            _stop([], actors)
            raise
        return actors

    def _task(self, fn: Callable[..., Any], label: str, res: Resources):
        """fn as a Ray remote function named after the processor, registered once per shape."""
        import ray

        key = (fn, label, res, tuple(sorted(_fault_env().items())))
        if key not in self._remote:
            options = {
                "num_cpus": res.cpus,
                "num_gpus": res.gpus,
                "max_retries": res.retries,
                "name": label,
                **({"memory": res.memory} if res.memory else {}),
                **_fault_env(),
            }
            self._remote[key] = ray.remote(**options)(fn)
        return self._remote[key]


class RayPool:
    """Actors that keep their processor (set up on the first call) and its state."""

    def __init__(self, executor: RayExecutor, ref: list, actors: list):
        self.executor, self.ref, self.actors, self.size = executor, ref, actors, len(actors)

    def run(self, items: list) -> list:
        if len(items) != self.size:
            raise ValueError(f"{len(items)} items for {self.size} workers")
        import ray

        return [self._result(ray.get(call)) for call in self._submit(items)]

    def broadcast(self, item: Any) -> Iterator:
        import ray

        ref = ray.put(item)  # one copy in the object store, whatever the number of workers
        pending = self._submit([ref] * self.size)
        while pending:  # in completion order: the caller holds one result at a time
            done, pending = ray.wait(pending, num_returns=1)
            yield self._result(ray.get(done[0]))

    def _submit(self, items: list) -> list:
        return [
            a.process.remote(self.ref, i, item)
            for i, (a, item) in enumerate(zip(self.actors, items, strict=True))
        ]

    def _result(self, returned: tuple) -> Any:
        """A worker's result; the bytes it metered go to the executor's count."""
        _index, result, _node, io = returned
        self.executor._io += io
        return result
