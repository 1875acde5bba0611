"""One run at a time per run folder: ``RUN/run.lock`` names the host and process that write the folder.

:func:`check_output_dir` refuses a path that cannot become a run folder before any work; :class:`RunLock` creates
the folder and takes the lock (an exclusive create, so two starts cannot both win). A lock left by a process that
has ended (same host, that pid no longer runs, or runs a newer process) is taken over with a warning; a lock held
by a live process, or written on another host (which cannot be checked from here), stops the second run with one
line naming the holder. Under several processes only the main process takes it (:func:`hold_run_folder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sslvit.errors import UserError
from sslvit.weights.run import RunFolder

log = logging.getLogger("sslvit")


class RunFolderLocked(UserError):
    """Another run writes this run folder."""


def check_output_dir(root: Path) -> None:
    """Refuse a run folder that is a file, lies under a file, or cannot be written (before any work).

    Raises:
        UserError: one sentence naming the path and what is wrong with it.
    """
    if root.exists() and not root.is_dir():
        raise UserError(f"--output-dir {root} is a file, not a folder: give a folder for the run (or a new path)")
    existing = next((p for p in [root, *root.parents] if p.exists()), Path.cwd())
    if not existing.is_dir():
        raise UserError(f"--output-dir {root}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {root}: {existing} is not writable by this user; choose a writable folder")


class RunLock:
    """The lock of one run folder: :meth:`acquire` creates ``root`` and ``root/run.lock``; :meth:`release` removes
    them again (the folder only when this lock made it and nothing else was written)."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, RunFolder(root).lock_file
        self.created_root = False
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning.

        Raises:
            RunFolderLocked: a live process (or one on another host) holds it.
            UserError: the folder or the lock file cannot be written.
        """
        try:
            self.created_root = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            if self._create():
                return
            holder = self._read()
            why = _stale(holder)
            if why is None:
                raise RunFolderLocked(
                    f"run folder {self.root} is in use by {_describe(holder)} (lock file {self.path}); wait for that "
                    f"run to end, or use another --output-dir. If no run uses it any more, delete {self.path}"
                )
            # take over: remove the stale lock only if it is still the one read (another start may have taken it)
            if self._read() == holder:
                self.path.unlink(missing_ok=True)
            if not self._create():
                raise RunFolderLocked(f"run folder {self.root} is in use by {_describe(self._read())} (just taken)")
            log.warning("took over the lock of %s in %s: %s", _describe(holder), self.root, why)
        except OSError as err:
            raise UserError(f"cannot write the run folder {self.root} (--output-dir): {err.strerror or err}") from err

    def release(self) -> None:
        """Remove the lock if this process holds it (and the folder if this lock made it and it stayed empty)."""
        if not self.held:
            return
        self.held = False
        if self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_root:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.root.rmdir()

    def _create(self) -> bool:
        """Create the lock file exclusively; False if one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(_holder_record(), f)
        self.held = True
        return True

    def _read(self) -> dict[str, Any]:
        """The lock file's record ({} if it is gone or unreadable: a half-written lock counts as nobody's)."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}


def _holder_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_started(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another run (its lock file is unreadable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _stale(holder: dict[str, Any]) -> str | None:
    """Why the lock's process cannot be running any more, or None when it may be (or cannot be checked)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None  # another host's process (or a record being written right now): not ours to judge
    started = _process_started(holder["pid"])
    if started is None:
        return f"process {holder['pid']} is no longer running"
    recorded = holder.get("pid_started")
    if isinstance(recorded, int | float) and started > recorded + 1.0:
        return f"pid {holder['pid']} now belongs to a newer process"
    return None


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (``time.time()`` clock), or None if there is no such process."""
    import psutil  # an accelerate dependency

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return time.time()  # it exists but cannot be inspected: treat it as running


@contextlib.contextmanager
def hold_run_folder(accelerator: Any, root: Path) -> Iterator[None]:
    """``with hold_run_folder(accelerator, root):`` the main process holds ``root``'s lock for the block.

    Every process learns whether the lock was taken (a broadcast), so all of them stop with the same error.
    """
    lock = RunLock(root)
    failure: UserError | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except UserError as err:
            failure = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if failure is None else str(failure)], from_process=0)[0]
        failure = failure or (RunFolderLocked(message) if message else None)
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        lock.release()
