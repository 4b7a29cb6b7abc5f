"""File helpers used everywhere a result is written or fingerprinted.

* :func:`atomic_write`: a file appears whole or not at all (temporary file in the same folder,
  ``fsync``, ``os.replace``), so a run killed at any point (SIGKILL) never leaves a truncated
  result, cache entry or report behind under the final name;
* :func:`remove_orphaned_temp_files`: the temporary files of writers that were killed;
* :func:`sha256_file`: the SHA-256 of a file, read in chunks; ``cached=True`` remembers it per
  path, size and modification time (a study fingerprints the same checkpoint for every cell).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "remove_orphaned_temp_files", "sha256_file"]


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write ``path`` through a temporary file that replaces it only when the block succeeds.

    Usage::

        with atomic_write(out) as tmp:
            df.to_parquet(tmp)

    Args:
        path: The final file (its folder is created).

    Yields:
        The temporary path (``.<name>.<host>-<pid>.<random>.tmp`` next to ``path``: the
        writer is named, so :func:`remove_orphaned_temp_files` can tell a dead writer's file
        from a live one's); write it by name.

    Raises:
        Whatever the block raises; the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{_host()}-{os.getpid()}"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text; returns ``path``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


_OWNER = re.compile(r"\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphaned_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` calls whose process died (SIGKILL
    mid-write) on this host; files of live writers and of other hosts are left alone.

    Args:
        folder: The folder to sweep (not recursive).

    Returns:
        The removed files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host()
    removed = []
    for p in sorted(folder.glob(".*.tmp")):
        m = _OWNER.search(p.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path, *, cached: bool = False) -> str:
    """Hex SHA-256 of a file's bytes.

    Args:
        path: The file.
        cached: Reuse the digest of a file with the same path, size and modification time
            (for fingerprints; integrity checks read the bytes every time).

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    p = Path(path).resolve()
    st = p.stat()
    if cached:
        return _sha256(str(p), st.st_size, st.st_mtime_ns)
    return _sha256.__wrapped__(str(p), st.st_size, st.st_mtime_ns)
