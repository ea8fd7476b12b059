"""Ray: starting or joining a cluster, and running stage processors on it.

Stages never import Ray. They hand this module a list of work items and a processor factory
(NeMo-Curator style: `setup()` once per worker, `process(item)` per item); this module runs
them as Ray tasks, or in a Ray Data actor pool where a processor is expensive to build, and
streams the results back. `map_stream` chains CPU tasks that produce batches into an actor
pool that consumes them (decode on CPUs, encode on GPUs).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from condense import faults
from condense.runtime import RayConfig

log = logging.getLogger(__name__)


# Bytes reserved per producing task of map_stream: a decode task imports torch (~0.6 GiB).
PRODUCE_MEMORY = 1 << 30
ACTOR_RETRIES = 3  # restarts of a killed actor, and retries of its work item (Ray Data: unbounded)


def _fault_env() -> dict:
    """Remote options handing the driver's failpoints (condense/faults.py) on to its workers,
    when it has a spec of its own (a failpoints file its Ray inherited needs nothing)."""
    env = faults.env()
    return {"runtime_env": {"env_vars": env}} if faults.ENV in env else {}


def _map_batches(ds, fn, *, retries: dict, **kwargs):
    """`ds.map_batches` with bounded retries. Ray 2.60 has no named parameter for them and warns
    that its `**ray_remote_args` go away in 2.64: the warning is silenced here, in one place."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, **_fault_env(), **retries)


_STARTED_HERE = False  # whether init_ray connected this process (so shutdown_ray may disconnect it)


def init_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join the cluster named by `address`, `ray.address` or RAY_ADDRESS, else start a local Ray.

    Under `ray job submit` RAY_ADDRESS is set, so the job attaches to the cluster it was sent to.
    A local Ray is sized to this machine and keeps its dashboard on 127.0.0.1.
    """
    import ray

    global _STARTED_HERE
    if ray.is_initialized():
        return
    _STARTED_HERE = True
    target = address or cfg.address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
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
    _quiet_ray_data()


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


class _DropNoise(logging.Filter):
    """Ray Data's per-dataset chatter, which would bury condense's own progress lines."""

    NOISE = (
        "Progress bars disabled",
        "execution finished in",
        "Tip: Use",
        "Registered dataset logger",
        "Starting execution of Dataset",
        "Execution plan of Dataset",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    for name in (
        "ray.data",
        "ray.data._internal.execution.streaming_executor",
        "ray.data.dataset",
        "ray.data._internal.progress",
    ):
        logging.getLogger(name).addFilter(_DropNoise())
    ctx = DataContext.get_current()
    # condense draws one progress bar per stage (items and rows/s); Ray Data's own bars and
    # per-dataset banners would interleave with it.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


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


def _build(factory: Callable[..., Any], shared: dict[str, Any]) -> Any:
    """A processor from its factory, set up (model loads, index builds) once."""
    processor = factory(**shared)
    setup = getattr(processor, "setup", None)
    if setup is not None:
        setup()
    return processor


def _resolve(shared_refs: dict[str, list]) -> dict[str, Any]:
    """Shared objects from the object store (each ref wrapped in a list so Ray passes it as is)."""
    import ray

    return {name: ray.get(refs[0]) for name, refs in shared_refs.items()}


def _run_item(factory: Callable[..., Any], shared: dict[str, Any], item: dict) -> tuple[Any, str]:
    """One item as a Ray task: build the processor, set it up, run it."""
    import ray

    return _build(factory, shared).process(item), ray.get_runtime_context().get_node_id()


class _ProcessorActor:
    """Ray Data callable class: builds the processor once per actor, runs it per item."""

    def __init__(self, factory: Callable[..., Any], shared_refs: dict[str, list]):
        import ray

        self.processor = _build(factory, _resolve(shared_refs))
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for blob in batch["item"]:
            item = pickle.loads(blob)
            results.append(pickle.dumps((self.processor.process(item), self.node_id)))
        return {"result": np.array(results, dtype=object)}


def _produce_batches(batch: dict[str, np.ndarray], produce, shared_refs: dict[str, list]):
    """Ray Data generator step: each work item becomes any number of output batches."""
    shared = _resolve(shared_refs)
    for blob in batch["item"]:
        yield from produce(pickle.loads(blob), **shared)


class _BatchActor(_ProcessorActor):
    """Ray Data callable class: builds the processor once per actor, runs it per batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.processor.process(batch)


class RayExecutor:
    """Runs processors over work items on the Ray cluster this process is attached to."""

    def __init__(self) -> None:
        self._remote: dict[tuple, Any] = {}  # remote functions, registered once each

    def cpus(self) -> int:
        return max(1, int(cluster_resources()["CPU"]))

    def gpus(self) -> int:
        return int(cluster_resources()["GPU"])

    def map_items(
        self,
        items: list[dict],
        factory: Callable[..., Any],
        *,
        shared: dict[str, Any] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        pool_size: int | None = None,
        actors: bool = False,
    ) -> Iterator[tuple[Any, str]]:
        """Yield (result, node_id) for every item, in completion order.

        By default each item is one Ray task that builds its processor and runs it: workers are
        reused, so a task costs milliseconds. With `actors`, a Ray Data actor pool builds each
        processor once (for processors that load a model or a GPU index). `shared` objects go
        to the object store once either way. At most `pool_size` items run at once, and never
        more than the cluster's CPUs and GPUs hold.
        """
        if not items:
            return
        # Never more at once than the cluster can hold: Ray Data would wait for the actors.
        fits_cpu = int(self.cpus() // num_cpus) if num_cpus else len(items)
        fits_gpu = int(self.gpus() // num_gpus) if num_gpus else len(items)
        pool_size = max(1, min(pool_size or len(items), len(items), fits_cpu, fits_gpu))
        if actors:
            yield from self._actor_pool(items, factory, shared, num_cpus, num_gpus, pool_size)
            return
        import ray

        shared_ref = ray.put(shared or {})
        task = self._task(_run_item, num_cpus, num_gpus)
        queue = iter(items)
        pending: list = []
        while True:
            for item in queue:
                pending.append(task.remote(factory, shared_ref, item))
                if len(pending) >= pool_size:
                    break
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def _actor_pool(self, items, factory, shared, num_cpus, num_gpus, pool_size):
        import ray
        import ray.data

        shared_refs = {name: [ray.put(value)] for name, value in (shared or {}).items()}
        ds = ray.data.from_items(
            [{"item": pickle.dumps(item)} for item in items], override_num_blocks=len(items)
        )
        ds = _map_batches(
            ds,
            _ProcessorActor,
            fn_constructor_kwargs={"factory": factory, "shared_refs": shared_refs},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool_size),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            retries={"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES},
        )
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for blob in batch["result"]:
                yield pickle.loads(blob)

    def map_stream(
        self,
        items: list[dict],
        produce: Callable[..., Iterator[dict[str, np.ndarray]]],
        factory: Callable[..., Any],
        *,
        produce_shared: dict[str, Any] | None = None,
        shared: dict[str, Any] | None = None,
        batch_size: int,
        produce_cpus: float = 1.0,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        pool_size: int = 1,
        produce_retries: int = 3,
    ) -> Iterator[dict[str, Any]]:
        """A two-step stream on Ray Data: `produce(item, **produce_shared)` runs in CPU tasks and
        yields batches (dicts of numpy columns, e.g. decoded and preprocessed images); an actor
        pool of `pool_size` processors (`factory(**shared)`, built once per actor: a model on
        its GPU) runs `process(batch)` on batches of `batch_size` rows and returns small
        result columns, yielded here row by row as they complete. Ray Data keeps both steps
        busy and bounds what waits between them, so CPUs decode while the models encode.

        A producer whose worker dies is retried `produce_retries` times, an actor that dies is
        restarted ACTOR_RETRIES times (Ray Data's defaults are unbounded: a poison input would
        loop forever); then the stream fails."""
        if not items:
            return
        import ray
        import ray.data

        def refs(values):
            return {name: [ray.put(value)] for name, value in (values or {}).items()}

        ds = ray.data.from_items(
            [{"item": pickle.dumps(item)} for item in items], override_num_blocks=len(items)
        )
        ds = _map_batches(
            ds,
            _produce_batches,
            fn_kwargs={"produce": produce, "shared_refs": refs(produce_shared)},
            batch_size=1,
            batch_format="numpy",
            num_cpus=produce_cpus,
            # What a producer may hold (a batch of decoded images). Remote args that differ also
            # keep Ray Data from fusing this step into the actors, which it would do where the
            # CPU and GPU counts match (CPU-only clusters): producing stays on CPU tasks.
            memory=PRODUCE_MEMORY,
            retries={"max_retries": produce_retries},
        )
        ds = _map_batches(
            ds,
            _BatchActor,
            fn_constructor_kwargs={"factory": factory, "shared_refs": refs(shared)},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool_size),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            retries={"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                yield dict(zip(names, values, strict=True))

    def _task(self, fn: Callable[..., Any], num_cpus: float, num_gpus: float = 0.0):
        """fn as a Ray remote function, registered once per resource shape."""
        import ray

        key = (fn, num_cpus, num_gpus)
        if key not in self._remote:
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **_fault_env()}
            self._remote[key] = ray.remote(**options)(fn)  # a killed worker's task: 3 retries
        return self._remote[key]

    def map_tasks(
        self, fn: Callable[..., Any], calls: list[tuple], *, num_cpus: float = 1.0
    ) -> list[Any]:
        """fn(*args) for every args in `calls`, as Ray tasks; results in the order of `calls`."""
        import ray

        task = self._task(fn, num_cpus)
        return ray.get([task.remote(*args) for args in calls])

    def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        **kwargs: Any,
    ) -> Any:
        """Run fn(*args, **kwargs) as one Ray task (for example k-means training on a GPU node)."""
        import ray

        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn)
        return ray.get(task.remote(*args, **kwargs))
