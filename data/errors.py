"""One exception for bad input, shown to the user as a single line, and a JSON reader that raises it."""

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InputError(Exception):
    """Bad input (a file, a flag, a model name): printed as one line, never a traceback."""


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an InputError raised by a script's main() into `error: ...` and exit status 2."""
    try:
        yield
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
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
