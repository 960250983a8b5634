"""One lock for work that processes on a node must not do twice at once (a dataset's local copy, a weights download,
synthetic data): an exclusive `fcntl.flock` that the kernel releases if its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive `fcntl.flock` on `path` (created if missing) for the duration of the block."""
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
