"""quantkit runs in a child process, for tests that signal or kill them."""

from __future__ import annotations

import signal
import subprocess
import sys


def _default_signals():
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def start_convert(src, out, *extra) -> subprocess.Popen:
    """A quantkit run in the background, with SIGINT and SIGHUP at their defaults even when the suite itself runs
    as a background job or under nohup (which make children ignore them)."""
    return subprocess.Popen([sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(out), "--no-progress",
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
