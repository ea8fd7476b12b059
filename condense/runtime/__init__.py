"""Execution layer: the only package (with jobs/) that imports Ray. Its config stays Ray-free."""

from __future__ import annotations

from condense.strict import StrictModel


class RayConfig(StrictModel):
    """How condense finds or starts Ray."""

    # Cluster to join ("auto", "ray://host:10001", "host:6379"); None: RAY_ADDRESS, else a local Ray.
    address: str | None = None
    num_cpus: int | None = None  # CPUs of a new local Ray; None: all of this machine's
    num_gpus: int | None = None  # GPUs of a new local Ray; None: Ray's own detection
    object_store_memory: int | None = None  # bytes, new local Ray's object store; None: default
    include_dashboard: bool = False  # start the dashboard with a new local Ray
    dashboard_host: str = "127.0.0.1"  # interface the dashboard binds to (local Ray only)
    progress: bool = True  # show a progress bar per stage
    verbose: bool = False  # show Ray's own logs and the workers' output (else in Ray's log folder)

    runtime_fields = frozenset(
        {
            "address",
            "num_cpus",
            "num_gpus",
            "object_store_memory",
            "include_dashboard",
            "dashboard_host",
            "progress",
            "verbose",
        }
    )


EXECUTORS = ("ray", "local")


def open_executor(kind: str, cfg: RayConfig, address: str | None = None):
    """The executor a run asked for: `ray` (joining or starting Ray) or `local` (this process)."""
    if kind == "local":
        from condense.runtime.local import LocalExecutor

        return LocalExecutor()
    if kind != "ray":
        raise ValueError(f"executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    from condense.runtime.ray import RayExecutor, init_ray

    init_ray(cfg, address)
    return RayExecutor()
