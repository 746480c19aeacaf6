"""The project's error type and the wrapper that turns it into a one-line message and an exit code."""

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, missing file): printed as one line, no traceback."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
            sys.exit(1)

    return wrapper
