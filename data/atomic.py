"""Atomic writes: a temporary file beside the target, then a rename, so a killed run never
leaves a truncated file where a good one was; and the checks that keep an output from
destroying something that is not an earlier output (an input, a directory, a device, a link)."""

import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from data.errors import InputError

_UMASK = os.umask(0)  # there is no getter: read the umask by setting it, then put it back
os.umask(_UMASK)


def check_output_target(path: str | os.PathLike) -> None:
    """Refuse to write where there is something other than a regular file (or nothing): a rename
    would turn /dev/stdout, a FIFO or a link into a plain file, and a directory cannot be replaced."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:  # e.g. a parent that is a file
        raise InputError(f"{path}: cannot write here ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory; give a file name for this output")
    if stat.S_ISLNK(mode):
        raise InputError(f"{path}: is a symbolic link; outputs are written only to regular files or new paths")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is not a regular file (a device, FIFO or socket); give a file path")


def _file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        status = os.stat(path)  # through links, so a link to an input is that input
    except OSError:  # not there (yet)
        return None
    return status.st_dev, status.st_ino


PathArgument = str | os.PathLike | Sequence[str | os.PathLike] | None


def _named_paths(arguments: dict[str, PathArgument]) -> list[tuple[str, str | os.PathLike]]:
    return [
        (flag, path)
        for flag, value in arguments.items()
        for path in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
        if path is not None
    ]


def check_outputs(outputs: dict[str, PathArgument], inputs: dict[str, PathArgument]) -> None:
    """Before any work: each output (flag -> path) is writable (check_output_target) and is neither
    another output nor one of the inputs (flag -> path or paths), so a run cannot replace what it reads."""
    read: dict[tuple[int, int], tuple[str, str | os.PathLike]] = {}
    for flag, path in _named_paths(inputs):
        if (identity := _file_identity(path)) is not None:
            read.setdefault(identity, (flag, path))
    written: dict[str, tuple[str, str | os.PathLike]] = {}
    for flag, path in _named_paths(outputs):
        check_output_target(path)
        other = read.get(_file_identity(path)) or written.get(os.path.realpath(path))
        if other is not None:
            raise InputError(f"{flag} {path} is the same file as {other[0]} {other[1]}; it would be replaced")
        written[os.path.realpath(path)] = (flag, path)


def _is_within(path: str, directory: str) -> bool:
    """Whether real path `path` is `directory` or lies below it."""
    return os.path.commonpath([path, directory]) == directory


def check_output_directory(
    flag: str, path: str | os.PathLike, inputs: dict[str, PathArgument], overwrite: bool
) -> None:
    """Before any work: `path`, an output directory written whole, is new (or, with `overwrite`, an existing
    directory), and neither is nor lies inside one of the inputs (flag -> path or paths) nor holds one:
    replacing it must not delete what the run reads."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:  # e.g. a parent that is a file
        raise InputError(f"{flag} {path}: cannot write here ({error.strerror or error})") from None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise InputError(f"{flag} {path}: is a symbolic link; give a new directory or an earlier output")
        if not stat.S_ISDIR(mode):
            raise InputError(f"{flag} {path}: exists and is not a directory")
        if not overwrite:
            raise InputError(f"{flag} {path}: already exists; give --overwrite to replace it")
    target = os.path.realpath(path)
    for input_flag, input_path in _named_paths(inputs):
        source = os.path.realpath(input_path)
        if _is_within(target, source) or _is_within(source, target):
            raise InputError(
                f"{flag} {path} would hold or lie inside {input_flag} {input_path}; writing it would replace an input"
            )


def _tidy_after_a_killed_replacement(path: Path) -> None:
    """What a killed atomic_directory left beside `path`: the directory it had moved aside comes back if
    `path` is missing (the kill came between its two renames); the rest, half-written or old, goes."""
    pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*")
    moved_aside = sorted((Path(name) for name in glob.glob(f"{pattern}.old")), key=lambda old: old.stat().st_mtime)
    if moved_aside and not os.path.lexists(path):
        os.replace(moved_aside.pop(), path)
    for leftover in [*moved_aside, *(Path(name) for name in glob.glob(f"{pattern}.tmp"))]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside `path` to fill; on success it takes `path`'s place by rename (an
    existing directory there is moved aside first, then deleted), on failure it is deleted and `path` is
    unchanged. What a killed earlier run left beside `path` is tidied first. An OS error (full disk, no
    permission) is one InputError line."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _tidy_after_a_killed_replacement(path)
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        yield temporary
        os.chmod(temporary, 0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs follow the umask as mkdir would
        if os.path.lexists(path):
            # A directory cannot be replaced by one rename: move the old one aside, then the new one in.
            previous = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, previous)
            os.replace(temporary, path)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary directory is left behind
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise InputError(
                f"{path}: cannot write ({error.strerror or error}); the previous one is unchanged"
            ) from None
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object; on success it replaces `path` in one rename, on failure it vanishes and
    the previous file stays. An OS error (full disk, read-only, no permission) is one InputError line."""
    path = Path(path)
    check_output_target(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, mode) as handle:
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs follow the umask as open() would
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary file is left behind
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise InputError(
                f"{path}: cannot write ({error.strerror or error}); the previous file is unchanged"
            ) from None
        raise


def remove_stale_temporaries(directory: str | os.PathLike, target_pattern: str) -> list[Path]:
    """Delete the temporary files that killed atomic writes left for targets matching `target_pattern`
    (a glob of file names in `directory`, e.g. `glob.escape("run_latest.pt")`); returns them."""
    stale = [Path(path) for path in glob.glob(os.path.join(glob.escape(str(directory)), f".{target_pattern}.*.tmp"))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)
