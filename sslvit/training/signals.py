"""Stopping a run cleanly on a signal: finish the current step, checkpoint, exit with :data:`STOPPED_EXIT_CODE`.

Schedulers ask a job to stop with a signal before they kill it: SLURM, Kubernetes and spot instances send SIGTERM
(SLURM can send SIGUSR1 ahead of time with ``--signal``), a terminal sends SIGINT on Ctrl-C. ``train.stop_signals``
names the ones that stop a pretraining run cleanly. A signal only sets a flag here; the loop reads it once per
optimisation step, in the same all-reduce as the non-finite guard (:func:`sslvit.training.loop.optimisation_step`),
so every process stops after the same step and none waits in a collective for a process that has left. A second
signal of the same kind stops at once, as without this module (the newest checkpoint stays intact).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sslvit.errors import RecipeError

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request after a checkpoint; run again to resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: stopped at once (a second Ctrl-C) without a new checkpoint

_requested: list[str] = []  # the signal that asked this process to stop (a list: set from a signal handler)


class RunStopped(SystemExit):
    """A run stopped on a signal; as a ``SystemExit`` it ends the command with ``code`` and no traceback.

    ``message`` is the line that was logged; callers of :func:`sslvit.train.pretrain` may catch it.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


def parse_stop_signals(names: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` -> the signals (``""``: none).

    Raises:
        RecipeError: a name that is no signal of this platform, or one that cannot be caught.
    """
    found = []
    for name in (n.strip().upper() for n in names.split(",") if n.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, name, None)
        if sig is None or sig in (signal.SIGKILL, getattr(signal, "SIGSTOP", None)):
            raise RecipeError(
                f"train.stop_signals: {name} is not a signal that can stop a run cleanly here; use names such as "
                "SIGTERM,SIGUSR1,SIGINT ('' for none)"
            )
        found.append(sig)
    return found


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop, or None."""
    return _requested[0] if _requested else None


@contextlib.contextmanager
def stop_on_signals(signals: list[signal.Signals], announce: bool) -> Iterator[None]:
    """``with stop_on_signals([...], announce):`` the signals set the stop flag instead of ending the process.

    ``announce``: write one line to stderr when the first signal arrives (the main process). Outside the main thread
    (where Python cannot install handlers) the signals keep their usual effect.
    """
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, functools.partial(_on_signal, previous=previous[sig], announce=announce))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()


def _on_signal(signum: int, frame: Any, previous: Any, announce: bool) -> None:
    name = signal.Signals(signum).name
    if _requested:  # asked twice: behave as if this module were not there
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)
        return
    _requested.append(name)
    if announce:  # os.write: safe inside a signal handler, unlike logging
        note = f"sslvit: {name}: finishing this step, then saving a checkpoint (send it again to stop at once)\n"
        os.write(2, note.encode())


def ignore_in_workers(loader: Any, signals: list[signal.Signals]) -> None:
    """Make ``loader``'s worker processes ignore ``signals``: a signal sent to the whole process group (Ctrl-C,
    ``kill -TERM -PGID``, SLURM) must reach the training process only, or a worker dies and the step fails.

    Call it before ``accelerator.prepare`` (which copies ``worker_init_fn``) and before the first iteration.
    """
    if getattr(loader, "num_workers", 0) and signals:
        loader.worker_init_fn = functools.partial(_worker_init, tuple(signals), loader.worker_init_fn)


def _worker_init(signals: tuple[signal.Signals, ...], chained: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    if chained is not None:
        chained(worker_id)
