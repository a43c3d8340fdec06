"""Writing a run's files so that a failed write is one clear line, never a traceback or a half-written file.

A full disk shows up as an ``OSError`` from Python's own writes, but as a ``SafetensorError`` (not an ``OSError``)
from safetensors' ``save_file``, with the OS error only in its message: :data:`WRITE_ERRORS` catches both and
:func:`write_problem` says which of the usual causes it was.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, SafetensorError)

_CAUSES = {  # errno -> (the words of the OS message, as safetensors passes it on; what to tell the user)
    errno.ENOSPC: ("no space left", "the disk is full"),
    errno.EDQUOT: ("quota", "the disk quota is exceeded"),
    errno.EROFS: ("read-only file system", "the file system is read-only"),
    errno.EACCES: ("permission denied", "permission denied"),
    errno.EPERM: ("operation not permitted", "operation not permitted, e.g. an immutable folder"),
}


def write_problem(error: Exception) -> str:
    """What went wrong in a failed write, in a few words: "the disk is full", ..."""
    code = getattr(error, "errno", None)
    text = str(error).lower()
    for num, (words, said) in _CAUSES.items():
        if code == num or (code is None and (words in text or f"os error {num})" in text)):
            return said
    detail = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:200]
    return f"writing failed ({detail})"


def write_fix(error: Exception, where: str = "train.output_dir") -> str:
    """The fix that goes with :func:`write_problem`: free space, or make the folder writable."""
    full = write_problem(error) in (_CAUSES[errno.ENOSPC][1], _CAUSES[errno.EDQUOT][1])
    return f"Free space under {where}" if full else f"Make {where} writable"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` as a whole or not at all: a temporary file renamed into place, removed if the write fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def append_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out: a short write is retried, so the disk running full raises ENOSPC
    instead of losing bytes silently (a torn last line is dropped on ``--resume``)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
