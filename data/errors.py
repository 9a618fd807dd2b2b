"""One exception for bad input, shown to the user as a single line (and `first_line`, which makes one of
another exception), a JSON reader and a UTF-8 encoder that raise it."""

import errno
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InputError(Exception):
    """Bad input (a file, a flag, a model name): printed as one line, never a traceback."""


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line, else its type (a zero-byte file gives EOFError(''))."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# OS errors that say where an output goes is full or closed, not that the code is wrong.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an InputError raised by a script's main() into `error: ...` and exit status 2; so too an OS
    error of a full, read-only or forbidden disk that no atomic writer caught (e.g. a log line)."""
    try:
        yield
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in OUTPUT_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        sys.exit(2)


def read_json_input(path: str | os.PathLike, kind: str) -> Any:
    """The parsed content of a user's JSON file; a missing or malformed file is an InputError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {kind}") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise InputError(f"{path}: cannot read this {kind} ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise InputError(f"{path}: JSON nested too deeply to be a {kind}") from None


def utf8(text: str, where: str) -> bytes:
    """`text` in UTF-8. A lone surrogate (JSON's escape "\\ud800" parses to one, and a pickle keeps it) is no
    text and has no UTF-8 (hashing, tokenizing or writing parquet would fail): an InputError naming `where`."""
    try:
        return text.encode()
    except UnicodeEncodeError as error:
        raise InputError(
            f"{where} holds a lone surrogate {text[error.start]!r} at character {error.start}, which is no text "
            "(UTF-8 has no encoding for it); fix or remove it"
        ) from None
