"""The executors' ways to run work: tasks and an actor pool; Ray and local give the same
results for the same processors."""

import os
from dataclasses import dataclass

import pytest

from condense.errors import InputError
from condense.runtime.local import LocalExecutor
from condense.runtime.processor import Processor, Resources, WorkItem, gather
from condense.runtime.ray import RayExecutor


@dataclass(frozen=True, kw_only=True)
class Number(WorkItem):
    n: int


@dataclass
class Counter(Processor):
    """Records the process it was set up in and how many items it saw there."""

    stage = "test"
    offset: int = 0
    actor: bool = False

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, actor=self.actor, workers=1)

    def setup(self) -> None:
        self.pid, self.seen = os.getpid(), 0

    def process(self, item):
        self.seen += 1
        return {"part": item.part, "value": item.n + self.offset, "pid": self.pid}


@pytest.fixture(params=["ray", "local"])
def executor(request):
    if request.param == "local":
        return LocalExecutor()
    request.getfixturevalue("ray_session")
    return RayExecutor()


def test_tasks_and_actor_pool_give_the_same_results(executor):
    items = [Number(part=str(i), n=i) for i in range(5)]
    for actor in (False, True):
        got = gather(executor, Counter(offset=10, actor=actor), items)
        assert [r["value"] for r in got] == [10, 11, 12, 13, 14]  # in the items' order
        done = [item for item, _result, _node in executor.map(Counter(actor=actor), items)]
        assert sorted(done, key=lambda i: i.n) == items  # the items themselves come back
    # One actor: set up once for every item.
    assert len({r["pid"] for r in gather(executor, Counter(actor=True), items)}) == 1


@dataclass
class Tally(Processor):
    """Adds what it is sent to what it holds: a worker whose state outlives a call."""

    stage = "test"

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, actor=True)

    def setup(self) -> None:
        self.total, self.pid = 0, os.getpid()

    def process(self, item):
        self.total += item.n
        return self.total, self.pid


def test_a_pool_keeps_each_workers_state_between_calls(executor):
    with executor.pool(Tally(), 2) as pool:
        assert [t for t, _ in pool.run([Number(part="a", n=1), Number(part="b", n=5)])] == [1, 5]
        again = list(pool.broadcast(Number(part="c", n=10)))  # as each finishes
        assert sorted(t for t, _ in again) == [11, 15]  # each worker its own total
        with pytest.raises(ValueError, match="1 items for 2 workers"):
            pool.run([Number(part="d", n=1)])
    if isinstance(executor, RayExecutor):  # two actors, set up once each
        assert len({pid for _, pid in again}) == 2


@dataclass
class TaskName(Processor):
    stage = "test"
    actor: bool = False

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, actor=self.actor, workers=1)

    def process(self, item):
        with open("/proc/self/cmdline", "rb") as f:  # the title Ray gives its worker process
            return f.read().split(b"\0")[0].decode()


def test_tasks_and_actors_carry_the_processor_label(ray_session):
    """Ray's dashboard shows a processor's stage and class for its tasks and actors."""
    items = [Number(part="0", n=0)]
    ex = RayExecutor()
    assert gather(ex, TaskName(), items) == ["ray::test:TaskName"]
    assert gather(ex, TaskName(actor=True), items)[0].startswith("ray::test:TaskName")


@dataclass
class Failing(Processor):
    """Raises on item 3 (a bad file a worker meets)."""

    stage = "test"
    actor: bool = False

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, actor=self.actor, workers=2)

    def process(self, item: Number):
        if item.n == 3:
            raise InputError(f"item {item.n} is bad")
        return item.n


def _idle(timeout: float = 30.0) -> bool:
    """Whether every CPU of the session's Ray is free again (no task or actor left behind)."""
    import time

    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def test_an_error_in_a_worker_reaches_the_caller_and_nothing_is_left_running(executor):
    from condense.cli import _find_condense_error

    items = [Number(part=str(i), n=i) for i in range(8)]
    for actor in (False, True):
        with pytest.raises(Exception) as info:
            gather(executor, Failing(actor=actor), items)
        assert str(_find_condense_error(info.value)) == "item 3 is bad"
    if isinstance(executor, RayExecutor):
        assert _idle(), "tasks or actors were left running"


def test_a_worker_the_cluster_cannot_hold_is_an_error_at_once(ray_session):
    from condense.errors import StageError

    @dataclass
    class Huge(Processor):
        stage = "test"

        @property
        def resources(self) -> Resources:
            return Resources(cpus=64)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)  # a task that cannot be placed would wait forever
    try:
        future = pool.submit(gather, RayExecutor(), Huge(), [Number(part="0", n=0)])
        with pytest.raises(StageError, match="test:Huge asks for 64 CPUs and 0 GPUs per worker"):
            future.result(timeout=30)
    finally:
        pool.shutdown(wait=False)


def test_a_dashboard_beyond_this_machine_is_warned_about():
    from condense.runtime import RayConfig
    from condense.runtime.ray import dashboard_warning

    assert dashboard_warning(RayConfig()) is None  # no dashboard by default
    assert dashboard_warning(RayConfig(include_dashboard=True)) is None  # 127.0.0.1
    assert dashboard_warning(RayConfig(include_dashboard=True, dashboard_host="::1")) is None
    warning = dashboard_warning(RayConfig(include_dashboard=True, dashboard_host="0.0.0.0"))
    assert "ray.dashboard_host 0.0.0.0 exposes the Ray dashboard" in warning
    assert "RAY_AUTH_MODE=token" in warning
