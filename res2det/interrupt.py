"""Graceful stop on SIGTERM / SIGINT: what schedulers (Slurm, Kubernetes, preemptible machines) and Ctrl-C send.

Inside ``stop_on_signals()`` the first SIGTERM or SIGINT is only recorded (``stop_requested()``): a long loop
(training, a folder ``infer``) checks it at a safe point (after an iteration, after an image's record is
written), leaves everything consistent (a checkpoint, complete lines) and raises ``Interrupted``, which the
command line turns into one line and exit code 128 + the signal number. A second signal ends the process at
once, with the same exit code; what is on disk is still complete (every file is written atomically).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Work stopped at a safe point on a signal; ``exit_code`` = 128 + the signal number (as the shell's)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_requested: list[int] = []  # the signal received first, while handlers are installed
_depth = 0  # nested stop_on_signals (the CLI and the Trainer both enter it): only the outermost installs


def stop_requested() -> int | None:
    """The number of the stop signal received so far (inside ``stop_on_signals``), else ``None``."""
    return _requested[0] if _requested else None


def stopping_on_signals() -> bool:
    """True inside ``stop_on_signals`` (the loops of this process stop on SIGTERM / SIGINT themselves)."""
    return _depth > 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    # os.write, not print: a handler may interrupt a print to the same stream (a re-entrant write raises)
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun every rank gets the signal: rank 0 speaks
    if _requested:
        if not quiet:
            os.write(2, f"res2det: second {signal_name(signum)}: stopped at once; files on disk are complete, "
                        f"resume from the last checkpoint / record\n".encode())
        os._exit(128 + signum)
    _requested.append(signum)
    if not quiet:
        os.write(2, f"res2det: {signal_name(signum)} received: stopping at the next safe point "
                    f"(send it again to stop at once)\n".encode())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Record SIGTERM / SIGINT instead of dying (see the module); the previous handlers come back on exit.
    Outside the main thread (where Python cannot set handlers) it does nothing."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = None
    if _depth == 0:
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        _requested.clear()
        for s in SIGNALS:
            signal.signal(s, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if previous is not None:
            for s, h in previous.items():
                signal.signal(s, h)
            _requested.clear()


__all__ = ["Interrupted", "stop_on_signals", "stop_requested", "stopping_on_signals", "signal_name"]
