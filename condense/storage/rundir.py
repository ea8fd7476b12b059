"""The run directory users inspect (DESIGN.md 3): config.yaml, manifest.json, one folder per stage.

Completion marks are written last and atomically (temporary file, fsync, rename), so a folder
without `_stage.json` is never trusted; a mark is trusted only while every file it lists is
there with its recorded size, and a mark that is not valid JSON (a full disk, a store without
atomic writes) counts as no mark: the stage is redone. manifest.json is rebuilt from the marks
when it is damaged.

condense deletes only what it created: a non-empty folder that is not a condense run is refused
before anything in it is touched (`claim`), and one driver at a time holds a run directory
(`RunLock`).

RUN may be a URL in an object store (`storage/fs.py`). There the completion mark is created
with a create-only write (never renamed into place), and the lock is a create-only object
that its driver keeps fresh (a heartbeat): a lock whose driver is gone is taken over at once on
the same host, and once it is older than LOCK_STALE seconds from anywhere else.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from condense.errors import CondenseError
from condense.storage.files import (
    atomic_write_json,
    create_once,
    files_intact,
    json_bytes,
    read_json,
)
from condense.storage.fs import RUN_STORES, is_url, location, remove_tree, sizes_under, unreachable

STAGE_MARK = "_stage.json"
PROGRESS_MARK = "_progress.json"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
LOCK = "_lock.json"
MARKS = (STAGE_MARK, PROGRESS_MARK)  # not listed among a stage's files


def stage_files(folder: Path) -> dict[str, int]:
    """Every file a finished stage holds, with sizes: its marks aside, and what lies under a
    name that starts with a dot (temporary files, scratch a later stage reads and removes)."""
    out = {
        name: size
        for name, size in sizes_under(folder).items()
        if not any(p.startswith(".") for p in name.split("/")) and name not in MARKS
    }
    return dict(sorted(out.items()))


MANIFEST_FIELDS = ("status", "rows_in", "rows_out", "dropped", "seconds", "config_hash", "versions")


def manifest_entry(mark: dict) -> dict:
    """A stage's line in manifest.json, from its completion record."""
    return {k: mark.get(k) for k in MANIFEST_FIELDS}


def _valid_mark(mark: Any) -> bool:
    return isinstance(mark, dict) and all(k in mark for k in ("rows_out", "config_hash", "files"))


class RunDir:
    """Paths and marks of one run."""

    def __init__(self, root: str | Path):
        self.root = location(root)
        self.lock: RunLock | None = None  # the driver's lock, checked before each commit

    def check_lock(self) -> None:
        """Raise if this driver lost the run directory to another (see RunLock.check)."""
        if self.lock is not None:
            self.lock.check()

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def stage_mark(self, stage: str) -> dict | None:
        """The stage's completion record, or None when it has not completed: no mark, a mark
        that is damaged, or one whose files are no longer all there with their sizes."""
        mark = read_json(self.stage_dir(stage) / STAGE_MARK)
        if not _valid_mark(mark) or not files_intact(self.stage_dir(stage), mark["files"]):
            return None
        return mark

    def write_stage_mark(self, stage: str, record: dict) -> None:
        path = self.stage_dir(stage) / STAGE_MARK
        if not is_url(path):
            atomic_write_json(path, record)
        elif not create_once(path, json_bytes(record)):  # the stage was started without it
            raise CondenseError(
                f"{path} appeared while this driver ran the stage: another driver is writing "
                "this run directory"
            )

    def progress_mark(self, stage: str) -> dict | None:
        return read_json(self.stage_dir(stage) / PROGRESS_MARK)

    def start_stage(self, stage: str, fingerprint: str, resume: bool) -> bool:
        """Prepare a stage folder; returns True when finished parts of an interrupted run are kept.

        Without `resume`, or when the leftover parts were made with other settings, the folder is
        emptied: a half-written stage is never trusted.
        """
        folder = self.stage_dir(stage)
        progress = self.progress_mark(stage)
        keep = resume and progress is not None and progress.get("fingerprint") == fingerprint
        if not keep:
            self.clear_stage(stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAGE_MARK).unlink(missing_ok=True)
        atomic_write_json(
            folder / PROGRESS_MARK, {"fingerprint": fingerprint, "started": time.time()}
        )
        return keep

    def clear_stage(self, stage: str) -> None:
        remove_tree(self.stage_dir(stage))

    def finish_stage(self, stage: str, record: dict) -> None:
        """Write the completion mark last, listing the stage's files, then drop the progress mark."""
        self.check_lock()
        self.write_stage_mark(stage, {**record, "files": stage_files(self.stage_dir(stage))})
        (self.stage_dir(stage) / PROGRESS_MARK).unlink(missing_ok=True)

    def manifest(self) -> dict:
        """manifest.json, or, when it is missing or damaged, the same rebuilt from the marks."""
        manifest = read_json(self.root / MANIFEST)
        if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict):
            return manifest
        stages = {}
        if self.root.is_dir():
            for folder in sorted((p for p in self.root.iterdir() if p.is_dir()), key=str):
                mark = self.stage_mark(folder.name)
                if mark is not None:
                    stages[folder.name] = manifest_entry(mark)
        return {"stages": stages}

    def update_manifest(self, stage: str, entry: dict | None) -> None:
        manifest = self.manifest()
        if entry is None:
            manifest["stages"].pop(stage, None)
        else:
            manifest["stages"][stage] = entry
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.root / MANIFEST, manifest)


def is_run(root: Path) -> bool:
    """Whether `root` holds a condense run: its manifest, its lock, or a stage's marks."""
    root = location(root)
    manifest = read_json(root / MANIFEST)
    if isinstance(manifest, dict) and "stages" in manifest:
        return True
    if (root / LOCK).exists():
        return True
    return any((p / m).exists() for p in root.iterdir() if p.is_dir() for m in MARKS)


def claim(root: str | Path, inputs: tuple[str | None, ...] = ()) -> Path:
    """Make `root` a run directory, or refuse before touching anything: a file, a non-empty
    folder that is not a condense run (condense deletes stage folders it reruns, and must
    never delete what it did not create), or a folder inside one of the `inputs` (the run would
    be read back as input). A new run gets its manifest at once, which marks it as condense's."""
    from condense.errors import ConfigError

    root = location(root)
    if is_url(root) and str(root).split("://", 1)[0] not in RUN_STORES:
        raise ConfigError(
            f"run directory {root}: in an object store, a run directory needs create-only "
            f"writes (one driver per run, completion marks); use {' or '.join(s + '://' for s in RUN_STORES)}"
        )
    for source in inputs:
        if not source or is_url(source) != is_url(root):
            continue
        if is_url(root):
            inside = (str(root).rstrip("/") + "/").startswith(str(source).rstrip("/") + "/")
        else:
            here, source_path = root.resolve(), Path(source).resolve()
            inside = here == source_path or source_path in here.parents
        if inside:
            raise ConfigError(
                f"run directory {root} is inside the input {source}: choose a --run-dir outside it"
            )
    try:
        exists, folder = root.exists(), root.is_dir()
    except Exception as exc:  # no credentials, no such bucket, no network
        raise ConfigError(
            f"run directory {root}: cannot reach it ({unreachable(root, exc)})"
        ) from None
    if exists and not folder:
        raise ConfigError(f"run directory {root} is a file")
    if folder and any(root.iterdir()) and not is_run(root):
        raise ConfigError(
            f"run directory {root} is not empty and is not a condense run (no {MANIFEST}): "
            "condense refuses it rather than delete what it did not create; choose a new "
            "or empty --run-dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not isinstance(read_json(root / MANIFEST), dict):
        manifest = RunDir(root).manifest()  # rebuilt from the marks if it was damaged
        atomic_write_json(root / MANIFEST, manifest)
    # Absolute: workers get paths that do not depend on their working directory.
    return root if is_url(root) else root.resolve()


def _holder_here(holder: dict) -> str | None:
    """For a lock's holder of this host (other than this process): "alive" or "gone"; None for
    another host, this process, or a pid that cannot be read."""
    import socket

    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "alive"
    return "alive"


def _alive_here(holder: dict) -> bool:
    return _holder_here(holder) == "alive"


def _gone_here(holder: dict) -> bool:
    return _holder_here(holder) == "gone"


LOCK_HEARTBEAT = 10.0  # seconds between a store lock's refreshes
LOCK_STALE = 60.0  # a store lock not refreshed for this long is its dead driver's


class RunLock:
    """One driver per run directory: `RUN/_lock.json`, locked with `flock` for as long as the
    driver runs and naming it (host, pid, command, start). The kernel drops the lock when its
    holder dies however it dies, so a lock left by a killed driver is stale by definition: the
    next driver takes it over and says whose it was. A second live driver is refused with a
    message naming the holder.

    In an object store the lock is an object created with a create-only write, refreshed every
    LOCK_HEARTBEAT seconds and deleted on release. A lock whose holder is a dead process of this
    host, or that was not refreshed for LOCK_STALE seconds, is taken over."""

    def __init__(self, root: str | Path, log=print):
        self.path = location(root) / LOCK
        self.log = log
        self.fd: int | None = None
        self.token: str | None = None  # a store lock's holder id
        self.lost = False  # a store lock another driver took over
        self.stop = threading.Event()
        self.beat: threading.Thread | None = None

    def holder(self) -> dict | None:
        value = read_json(self.path)
        return value if isinstance(value, dict) and value else None

    def _record(self) -> dict:
        import socket
        import sys

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join(sys.argv)[:500],
            "started": time.time(),
        }

    def acquire(self) -> None:
        if is_url(self.path):
            self._acquire_object()
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(self.holder() or {}) from None
        except OSError as exc:  # a filesystem without locks (some FUSE mounts, Lustre)
            os.close(fd)
            raise CondenseError(
                f"run directory {self.path.parent}: its filesystem cannot lock {LOCK} ({exc}); "
                "put the run directory on a local disk or on NFS"
            ) from None
        previous = self.holder()
        if previous is not None and _alive_here(previous):
            # Locks that are not shared between processes (NFS mounted with local_lock=flock):
            # the holder is still running on this host.
            os.close(fd)
            raise self._in_use(previous)
        if previous is not None:
            self.log(
                f"[run] taking over the lock of host {previous.get('host')} pid "
                f"{previous.get('pid')}, which is gone (it was stopped or killed)"
            )
        record = self._record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record, indent=2) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def _acquire_object(self) -> None:
        import uuid

        self.token = uuid.uuid4().hex
        record = {**self._record(), "token": self.token, "heartbeat": time.time()}
        for _attempt in range(5):
            if create_once(self.path, json_bytes(record)):
                break
            previous = self.holder()
            if previous is None:  # being released or written right now: look again
                time.sleep(0.5)
                continue
            age = time.time() - float(previous.get("heartbeat", previous.get("started", 0)))
            # A live holder refreshes its lock every LOCK_HEARTBEAT seconds, whatever host it
            # runs on; one of this host whose pid is gone is stale at once.
            if not _gone_here(previous) and age < LOCK_STALE:
                raise self._in_use(previous, age)
            if (self.holder() or {}).get("token") != previous.get("token"):
                continue  # another driver took it over in between: look again
            self.log(
                f"[run] taking over the lock of host {previous.get('host')} pid "
                f"{previous.get('pid')}, which is gone (not refreshed for {age:.0f} s)"
            )
            self.path.unlink(missing_ok=True)
        else:
            raise CondenseError(
                f"{self.path}: could not take the run lock (it exists but cannot be read); if "
                "no driver runs on this run directory, delete that object and run again"
            )
        self.lost = False
        self.stop.clear()
        self.beat = threading.Thread(target=self._heartbeat, args=(record,), daemon=True)
        self.beat.start()

    def _heartbeat(self, record: dict) -> None:
        """Refresh the lock while this driver runs. If another driver took it over (this one
        stalled past LOCK_STALE), mark it lost: the run stops at its next part or mark."""
        from condense.storage.files import atomic_write_json

        while not self.stop.wait(LOCK_HEARTBEAT):
            try:
                current = self.holder()
                if not current or current.get("token") != self.token:
                    self.lost = True
                    self.log(f"[run] lost the lock {self.path} to another driver: stopping")
                    return
                atomic_write_json(self.path, {**record, "heartbeat": time.time()})
            except Exception as exc:  # a store hiccup: the next beat tries again
                self.log(f"[run] could not refresh the lock {self.path}: {exc}")

    def check(self) -> None:
        """Raise if this driver no longer holds the run directory (a store lock taken over)."""
        if self.lost:
            raise CondenseError(
                f"{self.path}: another driver took this run directory over (this one did not "
                f"refresh its lock for {LOCK_STALE:.0f} s); stopped so as not to write beside it"
            )

    def _in_use(self, h: dict, age: float | None = None):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
        fresh = "" if age is None else f", its lock refreshed {age:.0f} s ago"
        return CondenseError(
            f"run directory {self.path.parent} is in use by host {h.get('host', '?')} pid "
            f"{h.get('pid', '?')} (since {since}: {h.get('command', '?')}{fresh}); one driver "
            "per run directory: wait for it to finish, or choose another --run-dir"
        )

    def release(self) -> None:
        """Empty the lock file (a clean exit leaves no stale holder), then unlock it. A store
        lock is deleted, if it is still this driver's."""
        if self.token is not None:
            self.stop.set()
            if self.beat is not None:
                self.beat.join()
            current = self.holder()
            if current and current.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.token = None
            return
        if self.fd is None:
            return
        import fcntl

        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_job_run_dir(run_dir: str | None) -> None:
    """Under `ray job submit --working-dir`, the job runs in a per-job copy of the working dir,
    made anew on each node and deleted with the job: a relative (or the default) run directory
    would land there, differ between nodes and be lost. Refuse it, asking for an absolute path
    on shared storage."""
    from condense.errors import ConfigError

    env = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not env or is_url(run_dir):
        return
    try:
        working_dir = json.loads(env).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        return
    if working_dir and (run_dir is None or not os.path.isabs(run_dir)):
        raise ConfigError(
            f"--run-dir {run_dir or '(default)'}: under `ray job submit --working-dir` a relative "
            "run directory would be written into the job's temporary copy of the working dir "
            "(a different one on every node, deleted with the job); pass an absolute path on "
            "storage every node sees, e.g. --run-dir /shared/runs/x"
        )
