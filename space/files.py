"""File helpers: atomic writes (a crash never leaves a half-written file) and SHA-256 digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible: setting it is racy)."""
    with contextlib.suppress(OSError):
        match = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1), 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces ``path`` when the block succeeds.

    The block writes the yielded path by any means (``open``, ``np.save``, safetensors,
    the ONNX exporter). On an exception the temporary file is removed and ``path`` is left
    as it was.

    Args:
        path: The file to write; its folder is created when missing.
        mode: Permission bits for the result (default: ``0o666`` less the umask, as for any
            file the process creates; the temporary file is private until it is complete).

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically, flushed to disk first.

    Args:
        path: The file to write.
        data: Its whole content.
        mode: Permission bits for the result (default: from the umask).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
