"""The training loop: schedule, precision, compile, evaluation, checkpoints, resume and signals."""

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from nanogpt import data, distributed, runtime
from nanogpt.checkpoint import ResumeStore, resume_key, save_checkpoint
from nanogpt.config import Config
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError
from nanogpt.metrics import MetricsLog
from nanogpt.model import GPT
from nanogpt.optim import build_optimizers, lr_factor, set_lr
from nanogpt.progress import TrainProgress
from nanogpt.tokenizer import load_tokenizer


@dataclass(frozen=True)
class TrainPaths:
    data_dir: Path = Path("data")
    checkpoint: Path = Path("out/ckpt.pt")
    resume_dir: Path = Path("out/resume")
    metrics_dir: Path = Path("metrics")
    tensorboard_dir: Path = Path("out/tensorboard")


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving its resume state."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; "
            "resume state saved: run the same command again to continue"
        )
        self.signum = signum


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so state is saved whole."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, paths: TrainPaths = TrainPaths(), show_progress: bool = True) -> dict[str, Any]:
    """Train the model described by `cfg` on the encoded data; return the summary metrics.

    Writes the best-val checkpoint, metric series and summary (main process only), keeps resume state in
    `paths.resume_dir` until the run finishes, and raises Interrupted on SIGINT/SIGTERM.
    """
    device = runtime.resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = runtime.resolve_dtype(cfg.train.dtype, device)
    if cfg.train.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError(
                "train.tensorboard is true but tensorboard is not installed: "
                "pip install tensorboard, or set train.tensorboard=false"
            ) from None
    dist_info = distributed.init_from_env(device.type)
    try:
        return _Trainer(cfg, paths, device, dtype, dist_info, show_progress).run()
    finally:
        distributed.shutdown(dist_info)


class _Trainer:
    def __init__(
        self,
        cfg: Config,
        paths: TrainPaths,
        device: torch.device,
        dtype: torch.dtype,
        dist_info: DistInfo,
        show_progress: bool,
    ) -> None:
        self.cfg, self.tc, self.paths = cfg, cfg.train, paths
        self.device, self.dtype, self.dist = device, dtype, dist_info
        self.started = time.perf_counter() - (runtime.seconds_since_launch() or 0.0)
        self.tokenizer = load_tokenizer(paths.data_dir / "vocab.json")
        train_tokens = data.load_tokens(paths.data_dir / "train.pt")
        val_tokens = data.load_tokens(paths.data_dir / "val.pt")
        _check_tokens(train_tokens, val_tokens, self.tokenizer.vocab_size, cfg.model.block_size, paths.data_dir)
        self.evalset = data.eval_windows(val_tokens, cfg.model.block_size)
        first = self.tokenizer.decode(val_tokens[:1].tolist())
        predicted_chars = len(self.tokenizer.decode(val_tokens.tolist())) - len(first)
        self.tokens_per_char = self.evalset.num_targets / predicted_chars
        self.train_tokens = train_tokens.to(device)

        torch.manual_seed(self.tc.seed)
        self.model = GPT(cfg.model, self.tokenizer.vocab_size).to(device)
        self.optimizers = build_optimizers(self.model, self.tc, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.batch_rng = torch.Generator(device=device)
        self.batch_rng.manual_seed(self.tc.seed)
        torch.manual_seed(self.tc.seed + dist_info.rank)  # same initial weights on every rank, own dropout
        self.autocast = runtime.autocast(device, dtype)
        self.tokens_per_step = (
            self.tc.batch_size * cfg.model.block_size * self.tc.grad_accum_steps * dist_info.world_size
        )

        self.step, self.best_val, self.best_step = 0, math.inf, 0
        self.metrics = MetricsLog()
        self.store = ResumeStore(paths.resume_dir)
        settings = {
            "model": dataclasses.asdict(cfg.model),
            "train": dataclasses.asdict(self.tc),
            "device": device.type,
            "dtype": str(dtype),
            "world_size": dist_info.world_size,
        }
        data_files = [paths.data_dir / name for name in ("train.pt", "val.pt", "vocab.json")]
        self.key = resume_key(settings, data_files)
        self.progress = TrainProgress(self.tc.max_iters, 0, enabled=show_progress and dist_info.is_main)
        self._restore()
        if not distributed.same_on_all_ranks(self.step, dist_info):  # e.g. a host that cannot see rank 0's files
            raise UserError(
                f"the ranks found different resume states in {paths.resume_dir}: every host must see "
                "the one rank 0 writes (a shared filesystem), or delete it to start over"
            )
        self.progress.message(
            f"{self.model.num_params() / 1e6:.2f}M parameters on {device} ({str(dtype)[6:]}), "
            f"{self.tokens_per_step:,} tokens per step, ready {self.elapsed():.1f} s after launch"
        )

        self.ddp = None
        if dist_info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel  # imports all of torch.distributed: seconds

            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.compiled = runtime.resolve_compile(self.tc.compile, device)
        forward = self.ddp or self.model
        self.forward = torch.compile(forward, mode=self.tc.compile_mode) if self.compiled else forward
        self.writer = None
        if self.tc.tensorboard and dist_info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(paths.tensorboard_dir))

    def elapsed(self) -> float:
        """Seconds since the process was launched (plus the time of the runs this one resumes)."""
        return time.perf_counter() - self.started

    def _restore(self) -> None:
        state, why = self.store.load(self.key)
        self.progress.message(why)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.scaler.load_state_dict(state["scaler"])
        self.batch_rng.set_state(state["batch_rng"])
        if self.dist.rank == 0:
            torch.set_rng_state(state["cpu_rng"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        else:  # only rank 0's dropout RNG is saved; the others continue from a seed of their own
            torch.manual_seed(self.tc.seed + self.dist.rank + 1_000_003 * state["step"])
        self.step, self.best_val, self.best_step = state["step"], state["best_val"], state["best_step"]
        self.metrics = MetricsLog.from_state(state["metrics"], self.step)
        self.started -= state["elapsed"]
        if self.dist.is_main:
            self.store.restore_checkpoint(self.paths.checkpoint)
        self.progress.step(self.step)

    def _save_resume(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "key": self.key,
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "batch_rng": self.batch_rng.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "metrics": self.metrics.to_state(),
            "elapsed": self.elapsed(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.store.save(state, self.paths.checkpoint if self.best_step else None)

    def run(self) -> dict[str, Any]:
        tc = self.tc
        params = list(self.model.parameters())
        self.losses = torch.zeros(tc.max_iters, device=self.device)  # on the device: no per-step host sync
        self.norms = torch.zeros(tc.max_iters, device=self.device)
        self.flushed = self.step  # steps before this one are checked and logged
        self.start_step = self.step
        self.interval_start = time.perf_counter()
        self.intervals: list[tuple[int, float]] = []  # (tokens, seconds) between evaluations
        with _StopFlag() as stop:
            while self.step < tc.max_iters:
                if distributed.any_rank(stop.signum is not None, self.dist):  # all ranks stop at one step
                    self._flush()  # the state's series must reach self.step: the resumed run logs from there
                    self._save_resume()
                    self.progress.close()
                    raise Interrupted(stop.signum or signal.SIGTERM, self.step)
                set_lr(self.optimizers, lr_factor(self.step, tc))
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                loss = self._accumulate_gradients()
                for opt in self.optimizers:
                    self.scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
                self.losses[self.step], self.norms[self.step] = loss, norm
                if self.device.type != "cuda":  # a host check is free here: stop before the update
                    self._check_finite(self.step, self.step + 1)
                for opt in self.optimizers:
                    self.scaler.step(opt)
                self.scaler.update()
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                self.step += 1
                self.progress.step(self.step)
                if self.step % tc.eval_interval == 0 or self.step == tc.max_iters:
                    self._flush()
                    self._evaluate()
                if tc.resume_interval and self.step % tc.resume_interval == 0 and self.step < tc.max_iters:
                    self._flush()
                    saving = time.perf_counter()  # saving is not training: keep it out of tokens/s
                    self._save_resume()
                    self.interval_start += time.perf_counter() - saving
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.dist.is_main:
            self.store.clear()
        return self._summary()

    def _flush(self) -> None:
        """Check the steps since the last flush for non-finite values and log their losses (one host sync)."""
        self._check_finite(self.flushed, self.step)
        self._log_train(self.flushed, self.step)
        self.flushed = self.step

    def _accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over this rank's share of one optimizer step's batch; the mean loss."""
        total = torch.zeros((), device=self.device)
        b, accum, world = self.tc.batch_size, self.tc.grad_accum_steps, self.dist.world_size
        # every rank draws the whole step's windows from the same generator and takes its own slice, so
        # N ranks x k micro-steps x batch b see exactly the windows of one process with batch N*k*b
        starts = data.sample_starts(
            len(self.train_tokens), b * accum * world, self.cfg.model.block_size, self.batch_rng
        )
        for micro in range(accum):
            first = (micro * world + self.dist.rank) * b
            x, y = data.windows(self.train_tokens, starts[first : first + b], self.cfg.model.block_size)
            last = micro == accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    _, loss = self.forward(x, y)
                self.scaler.scale(loss / self.tc.grad_accum_steps).backward()
            total += loss.detach()
        return total / self.tc.grad_accum_steps

    def _check_finite(self, start: int, end: int) -> None:
        bad = ~torch.isfinite(self.losses[start:end])
        if not self.scaler.is_enabled():  # with fp16's scaler, inf gradients are skipped steps, not errors
            bad |= ~torch.isfinite(self.norms[start:end])
        if bad.any():
            step = start + int(bad.nonzero()[0]) + 1
            where = (
                f"the last good checkpoint {self.paths.checkpoint} (step {self.best_step}) is untouched"
                if self.best_step
                else "no checkpoint was written"
            )
            raise UserError(
                f"loss or gradient became non-finite at step {step}; training stopped, {where}: "
                "lower train.learning_rate or use train.dtype=bf16/fp32"
            )

    def _log_train(self, start: int, end: int) -> None:
        # each rank holds the loss of its own share of the batch: log the mean, the whole batch's loss
        values = distributed.all_reduce_sum(self.losses[start:end].clone(), self.dist) / self.dist.world_size
        self.metrics.train_rows.extend(
            (step + 1, value, lr_factor(step, self.tc) * self.tc.learning_rate)
            for step, value in enumerate(values.tolist(), start)
        )

    def _evaluate(self) -> None:
        runtime.synchronize(self.device)
        interval = time.perf_counter() - self.interval_start
        steps = self.step - max(self.start_step, self.metrics.val_rows[-1][0] if self.metrics.val_rows else 0)
        self.intervals.append((steps * self.tokens_per_step, interval))

        total, count = data.evaluate(
            self.model,
            self.evalset,
            self.tc.batch_size,
            self.autocast,
            self.tc.eval_iters,
            self.dist.rank,
            self.dist.world_size,
        )
        total, count = distributed.all_reduce_sum(total, self.dist), distributed.all_reduce_sum(count, self.dist)
        val_loss = float(total / count)
        val_bpc = data.bits_per_char(val_loss, self.tokens_per_char)
        self.metrics.val_rows.append((self.step, val_loss, val_bpc, self.elapsed()))
        if not math.isfinite(val_loss):
            raise UserError(
                f"validation loss is non-finite at step {self.step}; training stopped, "
                f"{self.paths.checkpoint} is untouched: lower train.learning_rate"
            )
        if val_loss < self.best_val:
            self.best_val, self.best_step = val_loss, self.step
            if self.dist.is_main:
                save_checkpoint(self.paths.checkpoint, self.model, self.tokenizer, self.step, val_loss)
        train_loss = self.metrics.train_rows[-1][1]
        tokens_per_sec = steps * self.tokens_per_step / interval
        self.progress.report(
            self.step, f"loss {train_loss:.4f}  val {val_loss:.4f}  bpc {val_bpc:.3f}  {tokens_per_sec:,.0f} tok/s"
        )
        if self.writer is not None:
            for name, value in (("loss/train", train_loss), ("loss/val", val_loss), ("val_bpc", val_bpc)):
                self.writer.add_scalar(name, value, self.step)
        if self.dist.is_main:
            self.metrics.write(self.paths.metrics_dir, self._summary())
        self.interval_start = time.perf_counter()

    def _summary(self) -> dict[str, Any]:
        best = next(r for r in self.metrics.val_rows if r[0] == self.best_step) if self.best_step else None
        steady = self.intervals[1:] or self.intervals  # the first interval holds compilation
        tokens_per_sec = sum(t for t, _ in steady) / max(sum(s for _, s in steady), 1e-9)
        return {
            "best_val_loss": round(self.best_val, 5) if best else None,
            "best_val_bpc": round(best[2], 5) if best else None,
            "best_step": self.best_step,
            "final_train_loss": round(self.metrics.train_rows[-1][1], 5) if self.metrics.train_rows else None,
            "final_val_loss": round(self.metrics.val_rows[-1][1], 5) if self.metrics.val_rows else None,
            "steps": self.step,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": round(tokens_per_sec),
            "wall_time_s": round(self.elapsed(), 2),
            "num_params": self.model.num_params(),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20)
            if self.device.type == "cuda"
            else None,
        }


def _check_tokens(
    train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int, block_size: int, data_dir: Path
) -> None:
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise UserError(
                f"{data_dir}/{name}.pt has token ids beyond the {vocab_size}-token vocabulary in "
                f"{data_dir}/vocab.json: rerun `dvc repro encode`"
            )
    if len(train_tokens) <= block_size:
        raise UserError(
            f"model.block_size ({block_size}) needs more than {block_size} training tokens, the train "
            f"split has {len(train_tokens)}: lower model.block_size or use a longer text"
        )
