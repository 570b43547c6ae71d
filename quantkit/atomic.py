"""Outputs appear whole or not at all: written under a temporary name in the target directory, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BadInput


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise BadInput(f"{path}: output exists (use --force to overwrite)")
    if not path.parent.exists():
        raise BadInput(f"{path.parent}: output directory does not exist")


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False):
    """Yields a temporary path next to `path`; renames it onto `path` only if the body finishes."""
    path = Path(path)
    check_output(path, force)
    prefix = f".{path.name}.partial-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent)) if directory else \
        Path(tempfile.mkstemp(prefix=prefix, dir=path.parent)[1])
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp create owner-only entries
    try:
        yield tmp
        if directory:
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            if path.is_dir():
                raise BadInput(f"{path}: is a directory, expected a file path")
            os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial output
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
