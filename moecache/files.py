"""Safe file access shared by every reader and writer.

Readers open regular files only (a named pipe or a device would block or never end).
Writers hold an exclusive lock on their output for the whole write, write to a
temporary file beside it and rename it into place, and report an operating-system
failure (unwritable folder, full disk) as one line naming the path and the reason.

A folder (a model checkpoint) is written the same way: filled as a hidden staging
folder beside it, then renamed into place (:func:`atomic_folder`).

The lock is ``fcntl.flock`` on a hidden file ``.<name>.lock`` beside the output. The
kernel releases it when its holder dies, so a killed writer never blocks the next one;
the holder removes the file when it is done. A killed writer leaves an empty lock file
and perhaps a temporary ``.<name>.XXXXXXXX.tmp``; the next writer takes both over and
removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MoecacheError

_TEMP_SUFFIX = ".tmp"
_HELD: dict[Path, int] = {}  # lock files this process holds, with their nesting depth


def os_reason(err: OSError) -> str:
    """The operating system's words for ``err`` (``No space left on device``), also for
    pyarrow's errors, which carry the number only in their text."""
    if err.strerror:
        return err.strerror
    number = err.errno or next((int(n) for n in re.findall(r"\[errno (\d+)\]", str(err), re.I)), None)
    return os.strerror(number) if number else first_line(err)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file; otherwise one-line MoecacheError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MoecacheError(f"{path}: no such file") from None
    except OSError as err:
        raise MoecacheError(f"{path}: cannot read: {os_reason(err)}") from None
    if stat.S_ISDIR(mode):
        raise MoecacheError(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise MoecacheError(f"{path}: not a regular file (a pipe or a device): expected a {what}")
    return path


def lock_path(path: Path) -> Path:
    """The hidden lock file of output ``path``."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive write lock of ``path``; another holder is a one-line error.

    Re-entrant within a process (a sweep holds its table's lock while rewriting it).
    """
    path = Path(path)
    lock = lock_path(path).absolute()
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
        return
    fd = _acquire(path, lock)
    _HELD[lock] = 1
    try:
        remove_stale_temps(path)
        yield
    finally:
        del _HELD[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a waiting writer sees the file gone and retries
        os.close(fd)


def _acquire(path: Path, lock: Path) -> int:
    with write_errors(path):
        folder = next(p for p in (path.absolute().parent, *path.absolute().parents) if p.exists())
        if not folder.is_dir():
            raise MoecacheError(f"{path}: cannot write: {folder} is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MoecacheError(f"{path}: another moecache process is writing it (it holds {lock}); "
                                    "wait for it to finish or stop it") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the previous holder removed this file as we opened it: take a fresh one


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one line naming it and the reason."""
    try:
        yield
    except OSError as err:
        raise MoecacheError(f"{path}: cannot write: {os_reason(err)}") from None


def atomic_target(path: Path) -> Path:
    """A temporary file beside ``path`` to be renamed onto it once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    _usual_mode(tmp, 0o666)  # mkstemp makes 0600; the final file gets the usual mode
    return Path(tmp)


def _usual_mode(path: str | os.PathLike, mode: int) -> None:
    """Give a private temporary file or folder ``mode`` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files a killed writer of ``path`` left (call with its lock held:
    only a lock holder makes them, so any that exist are dead)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


@contextlib.contextmanager
def atomic_write(path: Path, *, name: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``path``, on any failure it
    is removed and ``path`` is left as it was. OS errors become one-line MoecacheErrors
    naming ``name`` (default: ``path``)."""
    with write_errors(path if name is None else name):
        tmp = atomic_target(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path`` to fill; on success it is renamed onto
    ``path``, on any failure it is removed and ``path`` is left as it was. An existing
    ``path`` is replaced only with ``overwrite`` (moved aside first, put back if the
    rename fails). The write lock of ``path`` is held throughout."""
    path = Path(path)
    with output_lock(path):
        with write_errors(path):
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent))
            _usual_mode(staging, 0o777)  # mkdtemp makes 0700
        try:
            yield staging
            with write_errors(path):
                _replace_folder(staging, path, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _replace_folder(staging: Path, path: Path, *, overwrite: bool) -> None:
    if not path.exists():
        os.rename(staging, path)
        return
    if not overwrite:
        raise MoecacheError(f"{path}: already exists (pass --force to overwrite)")
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(backup)
    os.rename(path, backup)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
