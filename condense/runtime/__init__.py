"""Execution layer: the only package (with jobs/) that imports Ray. Its config stays Ray-free."""

from __future__ import annotations

from condense.strict import StrictModel


class RayConfig(StrictModel):
    """How condense finds or starts Ray."""

    address: str | None = (
        None  # existing cluster ("auto", "ray://host:10001", "127.0.0.1:6379"); None: RAY_ADDRESS or a new local Ray
    )
    num_cpus: int | None = None  # CPUs of a new local Ray; None: all of this machine's
    num_gpus: int | None = None  # GPUs of a new local Ray; None: Ray's own detection
    object_store_memory: int | None = (
        None  # bytes for a new local Ray's object store; None: Ray's default
    )
    include_dashboard: bool = False  # start the dashboard with a new local Ray
    dashboard_host: str = "127.0.0.1"  # interface the dashboard binds to (local Ray only)
    progress: bool = True  # show a progress bar per stage

    runtime_fields = frozenset(
        {
            "address",
            "num_cpus",
            "num_gpus",
            "object_store_memory",
            "include_dashboard",
            "dashboard_host",
            "progress",
        }
    )
