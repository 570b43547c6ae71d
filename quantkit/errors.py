"""User-facing errors: the CLI prints str(err) on one line and exits non-zero, never a traceback."""


class QuantkitError(Exception):
    """A user mistake or bad input. The message names the file/tensor/option and what was expected."""


class UnsupportedArchitecture(QuantkitError):
    pass


class BadInput(QuantkitError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised like Ctrl-C so the same cleanup runs (temporary outputs removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def os_error(e: OSError, path=None, doing: str = "") -> str:
    """One line for an OS error: the path, what was being done, the errno name and its meaning."""
    import errno
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    where = path if path is not None else (e.filename or "")
    cause = f"{name}: {e.strerror}" if name and e.strerror else (e.strerror or str(e))
    return f"{where}: {doing + ' (' if doing else ''}{cause}{')' if doing else ''}"
