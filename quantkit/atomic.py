"""Outputs appear whole or not at all, and never at the cost of something quantkit did not write.

An output is written under `.NAME.partial-PID-*` beside the target and renamed onto it at the end. A
directory target is replaced only when it is absent, empty, or a previous quantkit output (it holds the
MARKER file); a file target only with --force. While a run writes a target it holds an flock on
`.NAME.quantkit-lock`, so a second run on the same target fails at once; the lock holder also removes
`.partial-` / `.old-` leftovers of killed runs (flocks die with their process, even on SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BadInput, os_error

MARKER = ".quantkit-output"
_LOCKS: dict[Path, int] = {}  # target -> fd of its held lock file


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.quantkit-lock"


def _leftovers(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.*")
            if p.name.startswith((f".{path.name}.partial-", f".{path.name}.old-"))]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def lock_target(path: Path) -> None:
    """Take this process's lock on writing `path` (re-entrant); then clear leftovers of killed runs."""
    path = Path(os.path.abspath(path))
    if path in _LOCKS:
        return
    lp = _lock_path(path)
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BadInput(os_error(e, path.parent, "cannot create files in")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInput(f"{path}: another quantkit run is writing this output (lock {lp.name}); "
                           f"wait for it or choose another output") from None
        try:  # the holder before us may have unlinked the file we opened: lock the one that is there
            if os.fstat(fd).st_ino == os.stat(lp).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _LOCKS[path] = fd
    for p in _leftovers(path):  # nobody else holds the lock, so these belong to dead runs
        _remove(p)


def unlock_target(path: Path) -> None:
    path = Path(os.path.abspath(path))
    fd = _LOCKS.pop(path, None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            _lock_path(path).unlink()  # while still locked: a waiter re-checks the inode
        os.close(fd)


@atexit.register
def unlock_all() -> None:
    """Release every target lock this process holds (the CLI does at the end of each command)."""
    for p in list(_LOCKS):
        unlock_target(p)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved)."""
    return a == b or b in a.parents


def is_quantkit_output(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_output(path: Path, force: bool, directory: bool | None = None, inputs=()) -> None:
    """Refuse outputs that would overwrite or delete something quantkit did not write, before any work.
    directory: True/False when the output kind is known (None: either). inputs: paths the run reads."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not parent.exists():
        raise BadInput(f"{parent}: output directory does not exist")
    rp = path.resolve()
    if rp == Path.cwd().resolve():
        raise BadInput(f"{path}: output is the current directory; name a new directory (or file) instead")
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        rs = Path(src).resolve()
        if _inside(rp, rs) or _inside(rs, rp):
            raise BadInput(f"{path}: output is the input {src} or overlaps it; choose an output outside it")
    if path.is_dir():
        if directory is False:
            raise BadInput(f"{path}: is a directory, expected a file path")
        entries = [p.name for p in path.iterdir()]
        if entries and not is_quantkit_output(path):
            raise BadInput(f"{path}: directory exists and holds files quantkit did not write ({entries[0]} ...); "
                           f"choose a new or empty directory (--force replaces only a previous quantkit output)")
        if not force:
            raise BadInput(f"{path}: output exists (use --force to replace this "
                           f"{'previous quantkit output' if entries else 'empty directory'})")
    elif path.exists() or path.is_symlink():
        if directory:
            raise BadInput(f"{path}: exists and is not a directory; expected a directory for this output")
        if not force:
            raise BadInput(f"{path}: output exists (use --force to overwrite)")
    lock_target(path)  # creating the lock file also shows whether the directory is writable (EROFS, EACCES)


def ensure_free_space(directory: Path, nbytes: int) -> None:
    """Fail before writing when the file system plainly cannot hold `nbytes` more."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise BadInput(f"{directory}: not enough free space (ENOSPC): the output needs {nbytes / 2**20:.1f} MiB, "
                       f"{free / 2**20:.1f} MiB are free")


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False):
    """Yields a temporary path next to `path`; moves it onto `path` only if the body finishes."""
    path = Path(os.path.abspath(path))
    check_output(path, force, directory)
    prefix = f".{path.name}.partial-{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent)) if directory else \
            Path(tempfile.mkstemp(prefix=prefix, dir=path.parent)[1])
    except OSError as e:
        unlock_target(path)
        raise BadInput(os_error(e, path, "cannot write")) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp create owner-only entries
    try:
        try:
            yield tmp
            if directory:
                (tmp / MARKER).write_text("written by quantkit; --force may replace this directory\n")
                _swap_dir(tmp, path, force)
            else:
                _place_file(tmp, path, force)
        except OSError as e:
            if e.filename is None or str(e.filename).startswith(str(tmp)) or Path(e.filename) == path:
                raise BadInput(os_error(e, path, "cannot write")) from None
            raise
    except BaseException:  # includes KeyboardInterrupt and termination signals: never leave a partial output
        _remove(tmp)
        raise
    finally:
        unlock_target(path)


def _place_file(tmp: Path, path: Path, force: bool) -> None:
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, expected a file path")
    if force:
        os.replace(tmp, path)
        return
    try:  # exclusive: fails if something appeared at `path` since the check
        os.link(tmp, path)
    except FileExistsError:
        raise BadInput(f"{path}: output exists (use --force to overwrite)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():  # file systems without hard links
            raise BadInput(f"{path}: output exists (use --force to overwrite)") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _swap_dir(tmp: Path, path: Path, force: bool) -> None:
    old = None
    if path.is_dir() and any(path.iterdir()):
        if not (force and is_quantkit_output(path)):  # re-checked: the directory may have changed meanwhile
            raise BadInput(f"{path}: directory holds files quantkit did not write; left untouched")
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)  # onto an absent or empty directory only
    except OSError:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)
