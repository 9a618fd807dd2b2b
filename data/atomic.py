"""Atomic writes: a temporary file beside the target, then a rename, so a killed run never
leaves a truncated file where a good one was."""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

_UMASK = os.umask(0)  # there is no getter: read the umask by setting it, then put it back
os.umask(_UMASK)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object; on success it replaces `path` in one rename, on failure it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask as open() would
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)
