"""The project's error type, the wrapper that turns it into a one-line message and an exit code, one-line
warnings, out-of-memory errors turned into the settings to lower, and the way a stage ends its process."""

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, missing file): printed as one line, no traceback."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit status 2.

    Ctrl-C raises KeyboardInterrupt again from here on (the stages package ends the process at once while the stage
    imports), so that the stage's own handling (run_and_exit, training's resume state) decides what it does."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler):
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
            sys.exit(1)

    return wrapper


def warn(message: str) -> None:
    """A setting that is valid but most likely a mistake: one `warning: ...` line on stderr; the work goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# how torch words a failed allocation: torch.OutOfMemoryError (CUDA, MPS) and the CPU allocator's RuntimeError
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


@contextlib.contextmanager
def out_of_memory(doing: str, fix: str) -> Iterator[None]:
    """Turn an allocation that fails inside the block into a UserError `out of memory {doing}: {fix}`, so that the
    user reads which settings to lower rather than torch's traceback.

    Only an allocation that fails at once is caught: a setting far too large fails at its first big tensor. One
    that the allocator grants but the machine cannot hold is the kernel's to stop (its OOM killer).
    """
    try:
        yield
    except MemoryError:
        raise UserError(f"out of memory {doing}: {fix}") from None
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
        if not any(words in str(exc) for words in _OUT_OF_MEMORY):
            raise
        raise UserError(f"out of memory {doing}: {fix}") from None


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run a stage's `main` as the program; exit with its status as soon as it returns.

    A stage's outputs are written, fsynced and renamed into place by the time `main` returns, so the
    interpreter's teardown (torch.compile's worker processes, the CUDA context, garbage collection of the
    model) changes nothing on disk, yet DVC would wait seconds for it (BENCHMARKS.md): skip it. Ctrl-C
    outside training (which saves its state itself) ends quietly with status 130, as shells expect. An
    unexpected exception keeps its traceback and Python's normal exit.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError):  # the reader went away (`... | head`)
            stream.flush()
    os._exit(code)
