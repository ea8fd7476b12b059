"""Failpoints: named places where a test makes condense fail as the real world would (a worker
killed by the kernel mid-shard), so the recovery paths are tested on real processes.

A failpoint spec is `name:value` pairs separated by commas, for example `decode_kill:00000042`
(every decode worker that reaches sample key 00000042 is SIGKILLed: a poison sample). It comes
from `CONDENSE_FAILPOINTS`, which the Ray executor hands on to the tasks and actors it starts,
or from the file `CONDENSE_FAILPOINTS_FILE` names, read at each check, which lets a test arm
workers that are already running (its Ray inherited the variable). `kill_once` failpoints fire
once: the first process to reach one leaves a mark beside the file (or in
`CONDENSE_FAILPOINTS_DIR`) and is killed; the retry passes. With neither variable set, a check
costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CONDENSE_FAILPOINTS"
FILE_ENV = "CONDENSE_FAILPOINTS_FILE"
DIR_ENV = "CONDENSE_FAILPOINTS_DIR"


def _spec() -> str:
    spec = os.environ.get(ENV, "")
    path = os.environ.get(FILE_ENV)
    if path:
        try:
            with open(path) as f:
                spec += "," + f.read().strip()
        except FileNotFoundError:
            pass
    return spec


def _armed(name: str, value: str | None) -> bool:
    if not (os.environ.get(ENV) or os.environ.get(FILE_ENV)):
        return False
    return f"{name}:{value}" in _spec().split(",")


def kill_if(name: str, value: str | None) -> None:
    """SIGKILL this process whenever failpoint `name` is set for `value`."""
    if _armed(name, value):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_once(name: str, value: str | None) -> None:
    """SIGKILL this process the first time any process reaches failpoint `name` for `value`."""
    if not _armed(name, value):
        return
    folder = os.environ.get(DIR_ENV) or os.path.dirname(os.environ[FILE_ENV])
    try:
        os.close(os.open(os.path.join(folder, f"{name}-{value}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def pause_while(name: str, value: str | None) -> None:
    """Hold this process here while failpoint `name` is set for `value` (a test holds a driver
    mid-stage to try a second one, then kills it)."""
    while _armed(name, value):
        time.sleep(0.05)


def env() -> dict[str, str]:
    """The failpoint variables of this process, for the workers it starts."""
    return {k: os.environ[k] for k in (ENV, FILE_ENV, DIR_ENV) if os.environ.get(k)}
