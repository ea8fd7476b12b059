"""Failpoints: named places where a test makes condense fail as the real world would (a worker
killed by the kernel mid-shard), so the recovery paths are tested on real processes.

`CONDENSE_FAILPOINTS` holds `name:value` pairs separated by commas, for example
`decode_kill:00000042` (every decode worker that reaches sample key 00000042 is SIGKILLed: a
poison sample). `kill_once` failpoints fire once per run: the first process to reach them
leaves a mark in `CONDENSE_FAILPOINTS_DIR` and is killed; the retry passes. The Ray executor
hands both variables on to the tasks and actors it starts. Unset, a check costs one lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CONDENSE_FAILPOINTS"
DIR_ENV = "CONDENSE_FAILPOINTS_DIR"


def _armed(name: str, value: str | None) -> bool:
    spec = os.environ.get(ENV)
    return bool(spec) and f"{name}:{value}" in spec.split(",")


def kill_if(name: str, value: str | None) -> None:
    """SIGKILL this process whenever failpoint `name` is set for `value`."""
    if _armed(name, value):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_once(name: str, value: str | None) -> None:
    """SIGKILL this process the first time any process reaches failpoint `name` for `value`."""
    if not _armed(name, value):
        return
    mark = os.path.join(os.environ[DIR_ENV], f"{name}-{value}")
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def env() -> dict[str, str]:
    """The failpoint variables of this process, for the workers it starts."""
    return {k: os.environ[k] for k in (ENV, DIR_ENV) if os.environ.get(k)}
