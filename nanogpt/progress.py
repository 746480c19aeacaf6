"""Progress display: rich bars on a terminal, plain log lines when output goes to a file or CI."""

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def log(message: str) -> None:
    """One plain line on stdout, flushed so that logs interleave correctly under DVC and CI."""
    print(message, flush=True)


@contextlib.contextmanager
def byte_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n_bytes)`; show a byte progress bar on a terminal, one summary line otherwise."""
    start, done = time.perf_counter(), 0
    if is_terminal():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console()) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        return

    def advance(n: int) -> None:
        nonlocal done
        done += n

    yield advance
    log(f"{description}: {done:,} bytes in {time.perf_counter() - start:.1f} s")


class TrainProgress:
    """Step bar with loss, val loss, tokens/s and ETA; on a non-terminal, one line per report."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None
        if enabled and is_terminal():
            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(),
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def report(self, step: int, info: str) -> None:
        """Show `info` (loss, val loss, tokens/s) for `step`: in the bar, or as a log line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log(f"step {step}: {info}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
