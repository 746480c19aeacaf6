"""Metric series and summary in the layout DVC reads (TSV series for `dvc plots`, JSON for `dvc metrics`),
and the RunLog that reports them as training goes."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanogpt import files
from nanogpt.progress import TrainProgress

TRAIN_SERIES = "train_loss.tsv"  # step, train_loss, lr: one row per optimizer step
VAL_SERIES = "val_loss.tsv"  # step, val_loss, val_bpc, elapsed_s: one row per evaluation
SUMMARY = "train.json"


@dataclass
class MetricsLog:
    """Rows of the per-step and per-evaluation series; saved in the resume state so a resumed run continues them."""

    train_rows: list[tuple[int, float, float]] = field(default_factory=list)
    val_rows: list[tuple[int, float, float, float]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {"train_rows": self.train_rows, "val_rows": self.val_rows}

    @classmethod
    def from_state(cls, state: dict[str, Any], step: int) -> "MetricsLog":
        """The series up to and including `step`: rows past it were logged after the state was saved."""
        return cls(
            [tuple(r) for r in state["train_rows"] if r[0] <= step],
            [tuple(r) for r in state["val_rows"] if r[0] <= step],
        )

    def write(self, folder: Path | str, summary: dict[str, Any]) -> None:
        folder = Path(folder)
        files.write_text(folder / TRAIN_SERIES, _tsv(("step", "train_loss", "lr"), self.train_rows))
        files.write_text(folder / VAL_SERIES, _tsv(("step", "val_loss", "val_bpc", "elapsed_s"), self.val_rows))
        files.write_json(folder / SUMMARY, summary)


def _tsv(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["\t".join(header)]
    lines += ["\t".join(_fmt(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class RunLog:
    """What a training run reports as it goes: the metric series and summary (DVC's files, written by the
    main process only), the progress bar or log lines, TensorBoard, and the training speed between
    evaluations (time spent saving resume state left out)."""

    def __init__(
        self,
        folder: Path,
        tensorboard: Path | None,
        total_steps: int,
        tokens_per_step: int,
        is_main: bool,
        show_progress: bool,
    ) -> None:
        self.series = MetricsLog()
        self.folder, self.writes_files = folder, is_main
        self.progress = TrainProgress(total_steps, 0, show_progress and is_main, tokens_per_step)
        self.writer = None
        if tensorboard is not None and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard))
        self.intervals: list[tuple[int, float]] = []  # (tokens, seconds) between evaluations
        self.interval_start = time.perf_counter()
        self.interval_step = 0

    def start(self, step: int) -> None:
        """Training (re)starts at `step`: the first interval is measured from here."""
        self.interval_start, self.interval_step = time.perf_counter(), step
        self.progress.start(step)

    def step(self, step: int, loss: torch.Tensor) -> None:
        """`step` is done with this rank's `loss`: the bar moves, or now and then a line shows it where reading it
        makes the host wait for nothing (the CPU; a GPU's losses are read at the evaluations)."""
        self.progress.step(step, (lambda: float(loss)) if loss.device.type == "cpu" else None)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (spent on something other than training) out of the current interval."""
        self.interval_start += seconds

    def end_interval(self, step: int, tokens_per_step: int) -> float:
        """Close the interval since the last evaluation (the caller synchronised the device); its tokens/s."""
        seconds = time.perf_counter() - self.interval_start
        tokens = (step - self.interval_step) * tokens_per_step
        self.intervals.append((tokens, seconds))
        self.interval_start, self.interval_step = time.perf_counter(), step
        return tokens / max(seconds, 1e-9)

    def train_losses(self, first: int, losses: list[float], lrs: list[float]) -> None:
        """Add the rows of steps first+1, first+2, ... (steps count from 1 in the series)."""
        self.series.train_rows.extend(
            (first + i + 1, loss, lr) for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True))
        )

    def summary(
        self,
        best_val: float,
        best_step: int,
        steps: int,
        tokens_per_step: int,
        elapsed: float,
        num_params: int,
        device: torch.device,
    ) -> dict[str, Any]:
        """The run's summary metrics (metrics/train.json)."""
        train_rows, val_rows = self.series.train_rows, self.series.val_rows
        best = next(r for r in val_rows if r[0] == best_step) if best_step else None
        steady = self.intervals[1:] or self.intervals  # the first interval holds compilation and capture
        tokens_per_sec = sum(t for t, _ in steady) / max(sum(s for _, s in steady), 1e-9)
        return {
            "best_val_loss": round(best_val, 5) if best else None,
            "best_val_bpc": round(best[2], 5) if best else None,
            "best_step": best_step,
            "final_train_loss": round(train_rows[-1][1], 5) if train_rows else None,
            "final_val_loss": round(val_rows[-1][1], 5) if val_rows else None,
            "steps": steps,
            "tokens_per_step": tokens_per_step,
            "tokens_per_sec": round(tokens_per_sec),
            "wall_time_s": round(elapsed, 2),
            "num_params": num_params,
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)
            if device.type == "cuda"
            else None,
        }

    def evaluation(self, step: int, val_loss: float, val_bpc: float, tokens_per_sec: float) -> None:
        """Show an evaluation's results (the val row is already in the series)."""
        train_loss = self.series.train_rows[-1][1]
        self.progress.report(
            step, f"loss {train_loss:.4f}  val {val_loss:.4f}  bpc {val_bpc:.3f}  {tokens_per_sec:,.0f} tok/s"
        )
        if self.writer is not None:
            for name, value in (("loss/train", train_loss), ("loss/val", val_loss), ("val_bpc", val_bpc)):
                self.writer.add_scalar(name, value, step)

    def write(self, summary: dict[str, Any]) -> None:
        if self.writes_files:
            self.series.write(self.folder, summary)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
