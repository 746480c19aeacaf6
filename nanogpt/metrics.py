"""What a training run measures and reports: the validation loss and when it is due, the metric series and summary
in the layout DVC reads (TSV series for `dvc plots`, JSON for `dvc metrics`), the progress display, TensorBoard and
the training speed."""

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanogpt import data, distributed, files, runtime
from nanogpt.config import TrainConfig
from nanogpt.data import TrainData
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError
from nanogpt.progress import TrainProgress

TRAIN_SERIES = "train_loss.tsv"  # step, train_loss, lr: one row per optimizer step
VAL_SERIES = "val_loss.tsv"  # step, val_loss, val_bpc, elapsed_s: one row per evaluation
SUMMARY = "train.json"


def require_tensorboard() -> None:
    """A UserError now, before the work, when train.tensorboard is on but tensorboard is not installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(
            "train.tensorboard is true but tensorboard is not installed: "
            "pip install tensorboard, or set train.tensorboard=false"
        ) from None


class NonFinite(Exception):
    """The loss or gradient norm of optimizer step `step` (counting from 1) is not finite."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite loss or gradient at step {step}")
        self.step = step

    def user_error(self, checkpoint: Path, best_step: int) -> UserError:
        """What the user reads: the step, and the last good `checkpoint` (of `best_step`, 0: none) left untouched."""
        where = (
            f"the last good checkpoint {checkpoint} (step {best_step}) is untouched"
            if best_step
            else "no checkpoint was written"
        )
        return UserError(
            f"loss or gradient became non-finite at step {self.step}; training stopped, {where}: "
            "lower train.learning_rate or use train.dtype=bf16/fp32"
        )


def check_finite(first: int, losses: torch.Tensor, norms: torch.Tensor, scaled: bool) -> None:
    """Raise NonFinite naming the first step (counting from `first` + 1) whose loss or gradient norm is not finite.

    With fp16's grad scaler (`scaled`) an infinite gradient is a skipped step, not an error.
    """
    bad = ~torch.isfinite(losses)
    if not scaled:
        bad |= ~torch.isfinite(norms)
    if bad.any():
        raise NonFinite(first + int(bad.nonzero()[0]) + 1)


class Evaluator:
    """The validation loss every train.eval_interval steps and at the last, and the best one so far."""

    def __init__(
        self,
        cfg: TrainConfig,
        train_data: TrainData,
        autocast: contextlib.AbstractContextManager,
        dist: DistInfo,
        checkpoint: Path,
    ) -> None:
        self.cfg, self.data, self.autocast, self.dist, self.checkpoint = cfg, train_data, autocast, dist, checkpoint
        self.best_val, self.best_step = math.inf, 0

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_interval == 0 or step == self.cfg.max_iters

    def evaluate(self, model: torch.nn.Module, step: int) -> tuple[float, float]:
        """Loss and bits per character over the validation split at `step` (each rank its share of it); then
        `best_step == step` where it is the lowest so far. A non-finite loss is a UserError: the run stops before
        `checkpoint` is written."""
        share = (self.cfg.eval_iters, self.dist.rank, self.dist.world_size)  # this rank's batches
        total, count = data.evaluate(model, self.data.evalset, self.cfg.batch_size, self.autocast, *share)
        total, count = distributed.all_reduce_sum(total, self.dist), distributed.all_reduce_sum(count, self.dist)
        val_loss = float(total / count)
        if not math.isfinite(val_loss):
            raise UserError(
                f"validation loss is non-finite at step {step}; training stopped, "
                f"{self.checkpoint} is untouched: lower train.learning_rate"
            )
        if val_loss < self.best_val:
            self.best_val, self.best_step = val_loss, step
        return val_loss, data.bits_per_char(val_loss, self.data.tokens_per_char)


class MetricsRecorder:
    """One run's metrics, from the steps to the files.

    Each step's loss, gradient norm and learning rate stay on the device until `flush` reads them back (at the
    evaluations and resume saves: no host sync per step). The speed is measured over training time only: time
    inside `paused()` (evaluations, saves) and the first steps of a launch that compile are left out. The main
    process writes the files and shows the progress. `tensorboard`: the event files' folder, with train.tensorboard;
    `scaled`: fp16's grad scaler skips a step with an infinite gradient, which is no error then.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        folder: Path,
        tensorboard: Path,
        tokens_per_step: int,
        device: torch.device,
        dist: DistInfo,
        scaled: bool,
        show_progress: bool,
    ) -> None:
        self.folder, self.tokens_per_step, self.device, self.dist = folder, tokens_per_step, device, dist
        self.scaled = scaled
        flush_every = min(cfg.max_iters, cfg.eval_interval)  # the series are read back at every evaluation
        self.train_rows: list[tuple] = []  # (step, train_loss, lr)
        self.val_rows: list[tuple] = []  # (step, val_loss, val_bpc, elapsed_s)
        self.losses = torch.zeros(flush_every, device=device)
        self.norms = torch.zeros(flush_every, device=device)
        lr_dtype = torch.float32 if device.type == "mps" else torch.float64  # a float lr as set_lr wrote it
        self.lrs = torch.zeros(flush_every, device=device, dtype=lr_dtype)
        self.progress = TrainProgress(cfg.max_iters, 0, show_progress and dist.is_main, tokens_per_step)
        self.writer = _summary_writer(tensorboard) if cfg.tensorboard and dist.is_main else None
        self.launched, self.earlier_runs = time.perf_counter() - (runtime.seconds_since_launch() or 0.0), 0.0
        self.intervals: list[tuple[int, float]] = []  # (tokens, training seconds) between evaluations
        self.paused_s = 0.0  # seconds spent in paused()
        self.pause_began: float | None = None  # when the pause now under way began
        self.start(0)

    def start(self, step: int, compile_steps: int = 0) -> None:
        """Training starts at `step` in this launch; its first `compile_steps` steps compile (left out of the speed)."""
        self.last_step = self.flushed = step
        self.mark = (step, self._training_clock())
        self.progress.launch(step, compile_steps)

    def since_launch(self) -> float:
        """Seconds since this process was launched (start-up included)."""
        return time.perf_counter() - self.launched

    def elapsed(self) -> float:
        """Seconds of this run so far: this launch's and those of the launches it resumes."""
        return self.since_launch() + self.earlier_runs

    def record_step(self, step: int, loss: torch.Tensor, norm: torch.Tensor, lr: float | torch.Tensor) -> None:
        """Optimizer step `step` (from 1) is done with this rank's `loss` and the gradient's `norm` (device tensors)
        at the learning rate `lr` (a float or a 0-d device tensor, copied on the device)."""
        i = step - 1 - self.flushed
        self.losses[i], self.norms[i], self.lrs[i] = loss, norm, lr
        self.last_step = step
        if step == self.progress.compiled_at:  # the speed measures from the first step that did not compile
            self.mark = (step, self._training_clock())
        # off a terminal a line shows the loss where reading it costs nothing (the CPU; a GPU's at the evaluations)
        self.progress.step(step, (lambda: float(loss)) if loss.device.type == "cpu" else None)

    def flush(self) -> None:
        """Read back the steps since the last flush (one host sync) into the series; NonFinite for a bad one.
        Every rank calls it: the series holds the mean of the ranks' losses, the whole batch's loss."""
        n = self.last_step - self.flushed
        losses, norms, lrs = self.losses[:n], self.norms[:n], self.lrs[:n]
        check_finite(self.flushed, losses, norms, self.scaled)
        values = distributed.all_reduce_sum(losses.clone(), self.dist) / self.dist.world_size
        rows = zip(values.tolist(), lrs.tolist(), strict=True)
        self.train_rows.extend((self.flushed + i + 1, loss, lr) for i, (loss, lr) in enumerate(rows))
        self.flushed = self.last_step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training (an evaluation, a save): the speed leaves it out."""
        self.pause_began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - self.pause_began
            self.pause_began = None
            self.progress.start(self.last_step)

    def evaluation(self, step: int, val_loss: float, val_bpc: float) -> None:
        """Record and show an evaluation at `step` (after a flush), with the speed since the last one."""
        self.val_rows.append((step, val_loss, val_bpc, self.elapsed()))
        clock = self._training_clock()
        tokens, seconds = (step - self.mark[0]) * self.tokens_per_step, clock - self.mark[1]
        self.intervals.append((tokens, seconds))
        self.mark = (step, clock)
        speed = f"{tokens / max(seconds, 1e-9):,.0f} tok/s" if step > self.progress.compiled_at else "compiling"
        train_loss = self.train_rows[-1][1]
        self.progress.report(step, f"loss {train_loss:.4f}  val {val_loss:.4f}  bpc {val_bpc:.3f}  {speed}")
        if self.writer is not None:
            for name, value in (("loss/train", train_loss), ("loss/val", val_loss), ("val_bpc", val_bpc)):
                self.writer.add_scalar(name, value, step)

    def summary(self, best_val: float, best_step: int, num_params: int) -> dict[str, Any]:
        """The run's summary metrics (metrics/train.json; README lists the keys). peak_memory_mib only on CUDA,
        where it is the memory torch allocated on the GPU (the process's memory elsewhere is another quantity)."""
        best = next(r for r in self.val_rows if r[0] == best_step) if best_step else None
        steady = self.intervals[1:] or self.intervals  # the first interval warms up the allocator and caches
        tokens_per_sec = sum(t for t, _ in steady) / max(sum(s for _, s in steady), 1e-9)
        summary = {
            "best_val_loss": round(best_val, 5) if best else None,
            "best_val_bpc": round(best[2], 5) if best else None,
            "best_step": best_step,
            "final_train_loss": round(self.train_rows[-1][1], 5) if self.train_rows else None,
            "final_val_loss": round(self.val_rows[-1][1], 5) if self.val_rows else None,
            "steps": self.last_step,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": round(tokens_per_sec),
            "wall_time_s": round(self.elapsed(), 2),
            "num_params": num_params,
        }
        if self.device.type == "cuda":
            summary["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        return summary

    def write(self, summary: dict[str, Any], writes: files.BackgroundWrites) -> None:
        """The series as they are now and `summary` in DVC's layout through `writes` (main process only)."""
        if self.dist.is_main:
            writes.submit(write_metrics, self.folder, list(self.train_rows), list(self.val_rows), summary)

    def state(self) -> dict[str, Any]:
        """The series for the resume state, flushed up to the last step (every rank calls it)."""
        self.flush()
        return {"train_rows": self.train_rows, "val_rows": self.val_rows}

    def restore(self, state: dict[str, Any], step: int, elapsed: float) -> None:
        """Continue the series of a run that saved `state` at `step` after `elapsed` seconds."""
        self.train_rows = [tuple(r) for r in state["train_rows"] if r[0] <= step]  # later rows: logged after the save
        self.val_rows = [tuple(r) for r in state["val_rows"] if r[0] <= step]
        self.earlier_runs = elapsed

    def message(self, text: str) -> None:
        self.progress.message(text)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()

    def _training_clock(self) -> float:
        """A clock that stands still inside `paused()`."""
        return (time.perf_counter() if self.pause_began is None else self.pause_began) - self.paused_s


def _summary_writer(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # only with train.tensorboard: an optional dependency

    return SummaryWriter(str(folder))


def write_metrics(folder: Path, train_rows: list[tuple], val_rows: list[tuple], summary: dict[str, Any]) -> None:
    files.write_text(folder / TRAIN_SERIES, _tsv(("step", "train_loss", "lr"), train_rows))
    files.write_text(folder / VAL_SERIES, _tsv(("step", "val_loss", "val_bpc", "elapsed_s"), val_rows))
    files.write_json(folder / SUMMARY, summary)


def _tsv(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["\t".join(header)]
    lines += ["\t".join(_fmt(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
