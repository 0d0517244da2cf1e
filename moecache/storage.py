"""Where traces are read from: local paths, or URIs of any filesystem pyarrow knows.

A path with a scheme (``s3://bucket/key.parquet``, ``gs://...``, ``hdfs://...``,
``file:///abs/path``: whatever :meth:`pyarrow.fs.FileSystem.from_uri` resolves) is read
through that pyarrow filesystem, with the credentials of its usual environment variables
(or those in the URI). Local paths and ``file://`` URIs are read through the operating
system, which refuses a pipe or a device instead of blocking on it.

Every failure is one line naming the location with any credentials removed
(``s3://***@bucket/key``): an unknown scheme or unreachable storage reads
``<uri>: cannot open: <reason>``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import TraceError
from .files import first_line, os_reason

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# query parameters that may carry credentials (access_key, secret_key, session_token, ...)
_SECRET_PARAMETER = re.compile(r"key|secret|token|password|credential|signature", re.IGNORECASE)
_HIDDEN = "***"

Kind = Literal["file", "folder", "missing"]


@dataclass(frozen=True)
class Location:
    """A file or folder: ``path`` on ``filesystem`` (None: the operating system's);
    ``name`` is how messages call it (the path or URI as given, credentials removed)."""

    path: str
    filesystem: pafs.FileSystem | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.path)

    def kind(self) -> Kind:
        """Whether it is a file (or anything else that is not a folder), a folder, or missing."""
        if self.filesystem is None:
            path = Path(self.path)
            return "folder" if path.is_dir() else "file" if path.exists() else "missing"
        with self.failures("open"):
            found = self.filesystem.get_file_info(self.path).type
        return {pafs.FileType.Directory: "folder", pafs.FileType.NotFound: "missing"}.get(found, "file")

    def glob(self, pattern: str) -> list[Location]:
        """The entries of this folder whose names match ``pattern``, sorted by name."""
        if self.filesystem is None:
            return [self.child(path.name) for path in sorted(Path(self.path).glob(pattern))]
        with self.failures("list"):
            entries = self.filesystem.get_file_info(pafs.FileSelector(self.path))
        return [self.child(name) for name in sorted(entry.base_name for entry in entries
                                                    if fnmatch.fnmatchcase(entry.base_name, pattern))]

    def child(self, name: str) -> Location:
        """The entry ``name`` of this folder."""
        path = str(Path(self.path) / name) if self.filesystem is None else f"{self.path.rstrip('/')}/{name}"
        return self._moved(path, "/" + name)

    def sibling(self, suffix: str) -> Location:
        """The location whose path is this one's with ``suffix`` appended."""
        return self._moved(self.path + suffix, suffix)

    def _moved(self, path: str, tail: str) -> Location:
        """Another location on this filesystem, its name this one's with ``tail`` added to the path."""
        if self.name == self.path:
            return Location(path, self.filesystem)
        cut = next((m.start() for m in re.finditer(r"[?#]", self.name)), len(self.name))  # before a query
        return Location(path, self.filesystem, self.name[:cut] + tail + self.name[cut:])

    def size(self) -> int:
        """Size in bytes of the file."""
        if self.filesystem is None:
            with self.failures("read"):
                return os.stat(self.path).st_size
        with self.failures("open"):
            return self.filesystem.get_file_info(self.path).size

    def open(self, what: str = "file") -> pa.NativeFile:
        """The file opened for random access. A local one must be a regular file (a pipe or a
        device is a one-line error saying a ``what`` was expected); elsewhere anything the
        filesystem cannot open for reading (a folder) is a one-line error."""
        if self.filesystem is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as err:
                raise TraceError(f"{self.name}: cannot read: {os_reason(err)}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise TraceError(f"{self.name}: not a regular file (a pipe or a device): "
                                     f"expected a {what}")
            finally:
                os.close(fd)
            with self.failures("read"):
                return pa.OSFile(self.path)
        with self.failures("open"):
            return self.filesystem.open_input_file(self.path)

    @contextlib.contextmanager
    def failures(self, doing: str) -> Iterator[None]:
        """Turn an OS or pyarrow error inside into one line: ``<name>: cannot <doing>: <reason>``
        (a missing file: ``<name>: no such file``)."""
        try:
            yield
        except FileNotFoundError:
            raise TraceError(f"{self.name}: no such file") from None
        except (OSError, pa.ArrowException) as err:
            reason = os_reason(err) if isinstance(err, OSError) else first_line(err)
            raise TraceError(f"{self.name}: cannot {doing}: {reason}") from None


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names its storage by a scheme (``s3://``, ``file://``, ...)."""
    return isinstance(path, str) and _SCHEME.match(path) is not None


def locate(path: str | os.PathLike | Location) -> Location:
    """The :class:`Location` of a local path or a URI; a URI pyarrow cannot resolve
    (an unknown scheme, storage it cannot reach) is a one-line TraceError."""
    if isinstance(path, Location):
        return path
    if not is_uri(path):
        return Location(str(Path(path)))
    name = redact(path)
    try:
        filesystem, inner = pafs.FileSystem.from_uri(path)
    except (OSError, pa.ArrowException, ValueError) as err:
        raise TraceError(f"{name}: cannot open: {_scrub(first_line(err), path)}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):  # file://: through the OS, which refuses pipes
        return Location(inner, None, name)
    return Location(inner, filesystem, name)


def os_path(path: str | os.PathLike) -> str | None:
    """The operating-system path of a local path or ``file://`` URI; None for a URI of
    other storage (which is not contacted)."""
    if is_uri(path) and urlsplit(str(path)).scheme.lower() != "file":
        return None
    return locate(path).path


def redact(uri: str) -> str:
    """``uri`` without its credentials: the user and password become ``***``, and so do
    the values of query parameters that hold keys, secrets or tokens."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # a malformed netloc: show the scheme only
        return uri.split("://", 1)[0] + f"://{_HIDDEN}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{_HIDDEN}@{netloc.rpartition('@')[2]}"
    query = "&".join(f"{key}={_HIDDEN}" if value is not None else key
                     for key, value in _parameters(parts.query))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _parameters(query: str) -> Iterator[tuple[str, str | None]]:
    """The ``key=value`` items of a query as written, with the value only for credentials
    (the key alone otherwise: the whole item)."""
    for item in query.split("&") if query else ():
        key, equals, value = item.partition("=")
        yield (key, value) if equals and _SECRET_PARAMETER.search(unquote(key)) else (item, None)


def _secrets(uri: str) -> list[str]:
    """The credentials written in ``uri``, as written and decoded, longest first."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return [uri]
    user = parts.netloc.rpartition("@")[0]
    found = [user, *(piece for piece in user.split(":") if len(piece) >= 4)]  # a short one is no key
    found += [value for _, value in _parameters(parts.query) if value is not None]
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def _scrub(text: str, uri: str) -> str:
    """``text`` with every credential of ``uri`` replaced by ``***``."""
    for secret in _secrets(uri):
        text = text.replace(secret, _HIDDEN)
    return text
