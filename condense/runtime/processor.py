"""The contract between stages and the workers that run them.

A stage cuts its work into **work items** (small frozen dataclasses, one kind per kind of work,
each naming the part it produces) and hands them, with a **processor**, to its context's
executor. A processor is a dataclass holding its settings; the executor ships it to each worker
once, calls `setup()` there once (load a model, build an index) and `process(item)` per item.
Its `resources` say what one worker holds; the executor alone decides from them whether items
run as tasks (a worker per item, reused by the runtime) or on long-lived actors.

    @dataclass
    class Doubler(Processor):
        stage = "demo"
        factor: int = 2

        def process(self, item: Slice) -> dict:
            return {"part": item.part, "rows_in": item.rows * self.factor}

    for item, result, node in executor.map(Doubler(), items): ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from condense.storage.meter import IOCount


@dataclass(frozen=True)
class Resources:
    """What one worker of a processor holds while it runs."""

    cpus: float = 1.0  # CPUs per worker (fractions share a CPU)
    gpus: float = 0.0  # GPUs per worker
    memory: int = 0  # bytes reserved per worker (0: no reservation)
    actor: bool = False  # long-lived actors (a model, a GPU index), else tasks on reused workers
    workers: int | None = None  # at most this many workers at once (None: as many as fit)
    retries: int = 3  # a worker that dies mid-item: times the item is tried again


@dataclass(frozen=True, kw_only=True)
class WorkItem:
    """One unit of work: it produces (or contributes to) the part it names."""

    part: str  # the part file (or record) this item writes
    rows: int = 0  # rows it handles, when known in advance (progress totals)


class Processor:
    """Base of every processor: `setup()` once per worker, `process(item)` per item.

    Subclasses are dataclasses whose fields are everything a worker needs (paths, settings,
    small arrays); they travel to the workers once per map, never per item.
    """

    stage: ClassVar[str] = ""  # the stage it belongs to: names its tasks and actors

    @property
    def resources(self) -> Resources:
        return Resources()

    @property
    def label(self) -> str:
        """The name Ray's dashboard shows for this processor's tasks and actors."""
        name = type(self).__name__
        return f"{self.stage}:{name}" if self.stage else name

    def setup(self) -> None:
        """Once per worker, before the first item."""

    def process(self, item: Any) -> Any:
        raise NotImplementedError


class Executor(Protocol):
    """Runs processors over work items. `RayExecutor` and `LocalExecutor` are the two."""

    name: str

    def cpus(self) -> int:
        """CPUs the executor can schedule on."""
        ...

    def gpus(self) -> int:
        """GPUs the executor can schedule on."""
        ...

    def map(self, processor: Processor, items: list) -> Iterator[tuple[Any, Any, str]]:
        """(item, result, node) for every item, in completion order."""
        ...

    def worker_io(self) -> IOCount:
        """Bytes metered by workers in other processes, summed over every item so far."""
        ...

    def pool(self, processor: Processor, workers: int) -> AbstractContextManager[WorkerPool]:
        """`workers` long-lived workers of `processor`, each set up once, that keep their
        state between calls (a share of a training sample held across iterations)."""
        ...


class WorkerPool(Protocol):
    """Workers that keep their state: call them again and again, each with its own item."""

    size: int

    def run(self, items: list) -> list:
        """Worker i processes items[i]; their results, in the workers' order."""
        ...

    def broadcast(self, item: Any) -> Iterator:
        """Every worker processes the same item (sent once); their results as they come."""
        ...


def gather(executor: Executor, processor: Processor, items: Iterable) -> list:
    """The results of `processor` over `items`, in the items' order."""
    items = list(items)
    results: list = [None] * len(items)
    index = {id(item): i for i, item in enumerate(items)}
    for item, result, _node in executor.map(processor, items):
        results[index[id(item)]] = result
    return results


def run_one(executor: Executor, processor: Processor, item: Any) -> Any:
    """`processor.process(item)` on one worker of the executor (a k-means round on a GPU)."""
    return gather(executor, processor, [item])[0]
