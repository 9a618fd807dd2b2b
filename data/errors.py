"""One exception for bad input, shown to the user as a single line."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


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
