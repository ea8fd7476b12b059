"""The local executor: every processor runs in the calling process, item after item.

The same processors, items and results as on Ray, so the data files of a run directory written
here are byte for byte the ones a Ray run writes (its records differ in timings and node ids
only). Use it to step through a stage with pdb, or to run the unit tests
without starting Ray:

    condense run configs/demo.yaml --executor local --run-dir runs/debug
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from condense.runtime.processor import Processor
from condense.storage.meter import IOCount

NODE = "local"  # the node name results carry


class LocalExecutor:
    """Runs processors in this process: `setup()` once per map (on a copy of the processor, as
    Ray's workers set up their own), then every item in order."""

    name = "local"

    def __init__(self, cpus: int | None = None, gpus: int | None = None):
        self._cpus, self._gpus = cpus, gpus

    def cpus(self) -> int:
        if self._cpus is None:
            try:
                self._cpus = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                self._cpus = os.cpu_count() or 1
        return self._cpus

    def worker_io(self) -> IOCount:
        """Nothing beyond this process: its items' bytes are metered here, with the driver's."""
        return IOCount()

    def gpus(self) -> int:
        if self._gpus is None:
            self._gpus = 0
            if shutil.which("nvidia-smi"):  # torch is imported only where a GPU may be
                import torch

                self._gpus = torch.cuda.device_count()
        return self._gpus

    @contextmanager
    def pool(self, processor: Processor, workers: int) -> Iterator[LocalPool]:
        yield LocalPool([copy.copy(processor) for _ in range(workers)])

    def map(self, processor: Processor, items: list) -> Iterator[tuple[Any, Any, str]]:
        if not items:
            return
        processor = copy.copy(processor)  # what setup() changes stays out of the caller's
        processor.setup()
        for item in items:
            yield item, processor.process(item), NODE


class LocalPool:
    """Workers of a local pool: copies of the processor in this process, each set up once."""

    def __init__(self, workers: list[Processor]):
        self.workers, self.size, self._ready = workers, len(workers), False

    def run(self, items: list) -> list:
        if len(items) != self.size:
            raise ValueError(f"{len(items)} items for {self.size} workers")
        self._setup()
        return [worker.process(item) for worker, item in zip(self.workers, items, strict=True)]

    def broadcast(self, item: Any) -> Iterator:
        self._setup()
        for worker in self.workers:
            yield worker.process(item)

    def _setup(self) -> None:
        if not self._ready:
            for worker in self.workers:
                worker.setup()
            self._ready = True
