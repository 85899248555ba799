"""One owner per workdir: a lock file naming the run that trains there.

Two trainers on one workdir would resume from each other's checkpoints and write the same
steps twice into metrics.jsonl. `hold(workdir)` writes `<workdir>/LOCK` (JSON: host, pid,
start time, heartbeat) with an exclusive create, refreshes its heartbeat from a daemon thread
and removes it on exit. A second run refuses with one line naming the owner. A lock is stale,
and is taken over with a warning, when its process is gone (same host) or its heartbeat is
older than STALE_AFTER_S (another host, or a machine that died). A lock that is not the JSON
this module writes (cut short, edited by hand) is judged by its file's age instead: refused while
it is younger than STALE_AFTER_S, taken over with a warning after.

On an object store (gs://...) the lock object is created with the precondition "does not
exist yet" (`if_generation_match=0`) when google-cloud-storage is installed; without it the
create is check-then-write, which leaves a small race window (logged once).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from jaxlm.run.errors import UserError, WorkdirLockedError

LOCK_NAME = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _is_remote(path: str) -> bool:
    return "://" in path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The fields of a lock and their types.
_FIELDS = {"host": (str,), "pid": (int,), "started": (int, float), "heartbeat": (int, float)}


def parse_owner(text: str) -> tuple[dict[str, Any] | None, str]:
    """(owner, "") of a well-formed lock's text; (None, what is wrong) otherwise."""
    try:
        owner = json.loads(text)
    except ValueError:
        return None, "not JSON" if text.strip() else "empty"
    if not isinstance(owner, dict):
        return None, f"not a JSON object but {type(owner).__name__}"
    for key, kinds in _FIELDS.items():
        value = owner.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return None, f"its {key!r} is {value!r}"
    return owner, ""


def check_workdir(workdir: str) -> None:
    """A local workdir must be a directory or become one: an existing file there, or above it,
    is a one-line error (instead of a FileExistsError traceback from makedirs)."""
    if _is_remote(workdir):
        return
    path = os.path.abspath(workdir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(workdir) else f"lies under the file {path}"
        raise UserError(f"--workdir {workdir} {where}, not a directory; give a directory (it "
                        "is created when missing)", path=path)


def _describe(owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {started}"


def stale_reason(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lock `owner` is stale, or None when its run may still be alive."""
    now = time.time() if now is None else now
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return "its process is gone"
    age = now - float(owner.get("heartbeat", owner.get("started", 0)))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f}s old"
    return None


class WorkdirLock:
    """The lock of one workdir (acquire/release; see `hold`)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = epath.Path(workdir) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                      "heartbeat": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self, text: str) -> bool:
        """Writes the lock only if none exists; False when one does."""
        if not _is_remote(self.workdir):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        return _create_remote(str(self.path), text)

    def _read(self) -> tuple[dict[str, Any] | None, str] | None:
        """(owner, "") of the lock, (None, what is wrong) when malformed, None when absent."""
        try:
            return parse_owner(self.path.read_text())
        except FileNotFoundError:
            return None

    def _age(self) -> float:
        """Seconds since the lock file was last written (inf when that cannot be told)."""
        try:
            return time.time() - self.path.stat().mtime
        except (OSError, AttributeError):
            return float("inf")

    def _write(self, text: str) -> None:
        """Rewrites the lock whole (a reader never sees it half-written)."""
        if _is_remote(self.workdir):
            self.path.write_text(text)
            return
        tmp = f"{os.fspath(self.path)}.{self.owner['token']}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.fspath(self.path))

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create(json.dumps(self.owner)):
                self._start_heartbeat()
                return
            read = self._read()
            if read is None:
                continue  # released meanwhile
            owner, malformed = read
            if owner is not None:
                reason = stale_reason(owner)
                if reason is None:
                    raise WorkdirLockedError(
                        f"workdir {self.workdir} is in use by another run ({_describe(owner)}); "
                        f"wait for it, use another --workdir, or delete {self.path} if that run "
                        "is gone", path=str(self.path))
                whose = _describe(owner)
            else:
                age = self._age()
                if age <= STALE_AFTER_S:
                    raise WorkdirLockedError(
                        f"workdir lock {self.path} is malformed ({malformed}) and was written "
                        f"{age:.0f}s ago, maybe by a run starting now; if no run trains in "
                        f"{self.workdir}, delete it", path=str(self.path))
                reason, whose = f"it is malformed ({malformed}) and {age:.0f}s old", "no run"
            logging.warning("taking over the stale lock %s of %s: %s", self.path, whose,
                            reason)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise WorkdirLockedError(f"could not take the lock {self.path}; another run keeps "
                                 "creating it", path=str(self.path))

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            owner = (self._read() or (None, ""))[0]
            if owner is None or owner.get("token") != self.owner["token"]:
                logging.warning("the workdir lock %s was taken by another run", self.path)
                return
            self.owner["heartbeat"] = time.time()
            self._write(json.dumps(self.owner))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        owner = (self._read() or (None, ""))[0]
        if owner is not None and owner.get("token") == self.owner["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


_warned_race = False


def _create_remote(url: str, text: str) -> bool:
    """Creates the lock object only if it does not exist (a generation precondition)."""
    global _warned_race
    if url.startswith("gs://"):
        try:
            from google.api_core import exceptions as gexc
            from google.cloud import storage
        except ImportError:
            pass
        else:
            bucket, _, name = url.removeprefix("gs://").partition("/")
            blob = storage.Client().bucket(bucket).blob(name)
            try:
                blob.upload_from_string(text, if_generation_match=0)
            except gexc.PreconditionFailed:
                return False
            return True
    path = epath.Path(url)
    if path.exists():
        return False
    if not _warned_race:
        _warned_race = True
        logging.warning("%s: no conditional create on this store; the workdir lock is "
                        "check-then-write", url)
    path.write_text(text)
    return json.loads(path.read_text()).get("token") == json.loads(text)["token"]


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True) -> Iterator[WorkdirLock | None]:
    """Holds the workdir's lock for the duration of the block (a no-op when not `enabled`,
    e.g. on processes other than 0 of a multi-host run). A workdir that is a file is refused
    either way."""
    check_workdir(workdir)
    if not enabled:
        yield None
        return
    lock = WorkdirLock(workdir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
