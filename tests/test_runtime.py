"""The executor's three ways to run work on Ray: tasks, an actor pool, a task-to-actor stream."""

import os

import numpy as np

from condense.runtime.ray import RayExecutor


class Counter:
    """Records the process it was set up in and how many items it saw there."""

    def __init__(self, offset: int):
        self.offset, self.pid, self.seen = offset, None, 0

    def setup(self) -> None:
        self.pid = os.getpid()

    def process(self, item):
        self.seen += 1
        if isinstance(item, dict) and "n" in item:
            return {"part": item["part"], "value": item["n"] + self.offset, "pid": self.pid}
        return {
            "rows": np.array([len(item["x"])]),
            "total": np.array([int(item["x"].sum())]),
            "same_process": np.array([bool((item["pid"] == os.getpid()).any())]),
        }


def test_tasks_and_actor_pool_give_the_same_results(ray_session):
    items = [{"part": str(i), "n": i} for i in range(5)]
    ex = RayExecutor()
    for actors in (False, True):
        got = sorted(
            r["value"]
            for r, _ in ex.map_items(
                items, Counter, shared={"offset": 10}, actors=actors, pool_size=1, num_cpus=0.5
            )
        )
        assert got == [10, 11, 12, 13, 14]
    # One actor: built and set up once for every item.
    pids = {
        r["pid"]
        for r, _ in ex.map_items(
            items, Counter, shared={"offset": 0}, actors=True, pool_size=1, num_cpus=0.5
        )
    }
    assert len(pids) == 1


def produce(item, scale):
    for start in range(0, item["n"], 4):
        x = np.arange(start, min(start + 4, item["n"])) * scale
        yield {"x": x, "pid": np.full(len(x), os.getpid())}


def test_stream_sees_every_produced_row_once(ray_session):
    ex = RayExecutor()
    items = [{"part": str(i), "n": n} for i, n in enumerate([0, 3, 9, 17])]
    results = list(
        ex.map_stream(
            items,
            produce,
            Counter,
            produce_shared={"scale": 2},
            shared={"offset": 0},
            batch_size=5,
            produce_cpus=0.5,
            num_cpus=0.5,
            pool_size=1,
        )
    )
    assert sum(int(r["rows"]) for r in results) == 29
    assert sum(int(r["total"]) for r in results) == 2 * sum(sum(range(n)) for n in [0, 3, 9, 17])
    assert all(int(r["rows"]) <= 5 for r in results)
    # Produced on CPU tasks, consumed in the actors: never fused into one process.
    assert not any(bool(r["same_process"]) for r in results)


def test_a_dashboard_beyond_this_machine_is_warned_about():
    from condense.runtime import RayConfig
    from condense.runtime.ray import dashboard_warning

    assert dashboard_warning(RayConfig()) is None  # no dashboard by default
    assert dashboard_warning(RayConfig(include_dashboard=True)) is None  # 127.0.0.1
    assert dashboard_warning(RayConfig(include_dashboard=True, dashboard_host="::1")) is None
    warning = dashboard_warning(RayConfig(include_dashboard=True, dashboard_host="0.0.0.0"))
    assert "ray.dashboard_host 0.0.0.0 exposes the Ray dashboard" in warning
    assert "RAY_AUTH_MODE=token" in warning
