"""SIGTERM and SIGHUP end a run the way Ctrl-C does: an exception unwinds, temporary outputs are removed,
and the CLI exits 128 + signal with one line. A signal ignored at start (nohup, background jobs) stays so."""

from __future__ import annotations

import signal

from .errors import Terminated


def _raise(signum, frame):
    raise Terminated(signum)


def install() -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) == signal.SIG_DFL:
            signal.signal(s, _raise)


def exit_code(e: KeyboardInterrupt) -> int:
    return 128 + getattr(e, "signum", signal.SIGINT)


def describe(e: KeyboardInterrupt) -> str:
    return f"interrupted ({signal.Signals(getattr(e, 'signum', signal.SIGINT)).name}); no output written"
