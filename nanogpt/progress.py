"""Progress display: rich bars on a terminal, plain log lines when output goes to a file or CI."""

import contextlib
import datetime
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

# Off a terminal, training prints a progress line this often (at the end of the first step after), besides one per
# evaluation, so that a log under DVC or CI shows that a long run is alive and when it will end.
LINE_EVERY_S = 10.0


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
    """Step bar with loss, val loss, tokens/s and ETA; on a non-terminal, one line per report and, between reports,
    a line every LINE_EVERY_S seconds: step, loss (where known), tokens/s and ETA since the last line.

    While the first steps of a launch compile (torch.compile, a CUDA graph's capture), the bar and the lines say
    so instead of a speed, and the speed and ETA after them leave them out.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        tokens_per_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled, self.total, self.tokens_per_step, self.clock = enabled, total_steps, tokens_per_step, clock
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
        self.launch(start_step)

    def launch(self, step: int, compile_steps: int = 0) -> None:
        """This launch trains from `step`, and its first `compile_steps` steps compile."""
        self.compiled_at, self.launched = step + compile_steps, self.clock()
        self.start(step)
        if self.bar is not None and compile_steps:
            self.bar.update(self.task, info="compiling")

    def start(self, step: int) -> None:
        """Training (re)starts at `step`, or an evaluation ended there: the next plain line measures from now."""
        self.mark = (step, self.clock())
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def step(self, step: int, loss: Callable[[], float] | None = None) -> None:
        """`step` is done; `loss()`, when given, reads its training loss (called only when a line is printed)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
            if step == self.compiled_at:
                self.bar.update(self.task, info="")
            return
        if not self.enabled:
            return
        now = self.clock()
        if now - self.mark[1] >= LINE_EVERY_S:
            value = loss() if loss else None
            if step <= self.compiled_at:
                log(compiling_line(step, self.total, value, now - self.launched))
            else:
                log(plain_line(step, self.total, value, self.tokens_per_step, self.mark, now))
            self.mark = (step, now)
        if step == self.compiled_at:  # the speed and ETA measure from the first step that did not compile
            self.mark = (step, now)

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


def compiling_line(step: int, total: int, loss: float | None, seconds: float) -> str:
    """`step 1/1500 (0%): loss 4.1744  compiling, 42 s so far`: `seconds` since the launch's first step began."""
    loss_part = f"loss {loss:.4f}  " if loss is not None else ""
    return f"step {step}/{total} ({100 * step // total}%): {loss_part}compiling, {seconds:.0f} s so far"


def plain_line(
    step: int, total: int, loss: float | None, tokens_per_step: int, since: tuple[int, float], now: float
) -> str:
    """`step 340/1500 (23%): loss 2.1345  12,345 tok/s  ETA 0:01:23`, the speed and ETA from the steps since
    `since` (step, time)."""
    steps, seconds = step - since[0], max(now - since[1], 1e-9)
    eta = datetime.timedelta(seconds=round((total - step) * seconds / max(steps, 1)))
    loss_part = f"loss {loss:.4f}  " if loss is not None else ""
    speed = f"{steps * tokens_per_step / seconds:,.0f} tok/s"
    return f"step {step}/{total} ({100 * step // total}%): {loss_part}{speed}  ETA {eta}"
