"""Atomic file writes: a temporary file beside the target, synced, then renamed over it.

A crash, Ctrl-C or a full disk leaves the old file or the new one, never half of one, and
no stray temporary. The one writer behind bundles, checkpoints and TensorRT engine caches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; it replaces `path` on a clean exit.

    The temporary (`.NAME.PID.tmp`, hidden, unique per process) is removed on any error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_writer(path) as f:
        f.write(data)
