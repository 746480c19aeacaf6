"""The training loop as named steps: build, restore, train_step, evaluate, save_resume.

One optimizer step is nanogpt/step.py (the textbook step, and on a GPU its CUDA-graph replay); the resume
state's layout is nanogpt/checkpoint.py's ResumeState.
"""

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

from nanogpt import data, distributed, files, runtime
from nanogpt.checkpoint import ResumeState, ResumeStore, resume_key, save_checkpoint
from nanogpt.config import Config, TrainConfig
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError, out_of_memory, warn
from nanogpt.metrics import SUMMARY, MetricsLog, RunLog
from nanogpt.model import GPT
from nanogpt.optim import WeightAverage, build_optimizers, lr_factor, set_lr, use_lr_tensors
from nanogpt.step import Batch, build_train_step
from nanogpt.tokenizer import Tokenizer, load_tokenizer


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
    if os.environ.get("RANK", "0") == "0":  # the main process writes the outputs and speaks for all
        for path, what in _outputs(paths):
            files.check_writable(path, what)  # now, not when the first checkpoint is due
        for warning in train_warnings(cfg.train, device, dtype):
            warn(warning)
    dist_info = distributed.init_from_env(device.type)
    try:
        with out_of_memory(f"building the model on {device}", "lower model.n_embd or model.n_layer"):
            trainer = Trainer(cfg, paths, device, dtype, dist_info, show_progress)
        with out_of_memory(
            f"training on {device} with batches of {cfg.train.batch_size} x {cfg.model.block_size} tokens",
            "lower train.batch_size (raising train.grad_accum_steps keeps the tokens per step), model.block_size "
            "or the model's size (model.n_embd, model.n_layer)",
        ):
            return trainer.run()
    finally:
        distributed.shutdown(dist_info)


@dataclass(frozen=True)
class TrainData:
    """The encoded splits: training tokens on the device, the validation windows, and the tokenizer."""

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    evalset: data.EvalSet
    tokens_per_char: float  # for bits per character: validation tokens over the characters they spell

    @classmethod
    def load(cls, folder: Path, block_size: int, device: torch.device) -> "TrainData":
        vocab = folder / "vocab.json"
        tokenizer = load_tokenizer(vocab)
        train_tokens = data.load_tokens(folder / "train.pt", tokenizer, vocab)
        val_tokens = data.load_tokens(folder / "val.pt", tokenizer, vocab)
        _check_tokens(train_tokens, val_tokens, tokenizer.vocab_size, block_size, folder)
        evalset = data.eval_windows(val_tokens, block_size)
        first = tokenizer.decode(val_tokens[:1].tolist())
        predicted_chars = len(tokenizer.decode(val_tokens.tolist())) - len(first)
        return cls(tokenizer, train_tokens.to(device), evalset, evalset.num_targets / predicted_chars)

    def batches(self, rng: torch.Generator, batch_size: int, micro_steps: int, dist: DistInfo) -> list[Batch]:
        """This rank's micro-batches of one optimizer step's random training windows.

        Every rank draws the whole step's windows from the same generator and takes its own slice, so N ranks
        x k micro-steps x batch b see exactly the windows of one process with batch N*k*b.
        """
        block_size = self.evalset.x.size(1)
        count = batch_size * micro_steps * dist.world_size
        starts = data.sample_starts(len(self.train_tokens), count, block_size, rng)
        firsts = [(micro * dist.world_size + dist.rank) * batch_size for micro in range(micro_steps)]
        return [data.windows(self.train_tokens, starts[first : first + batch_size], block_size) for first in firsts]


class StepSeries:
    """Each step's loss, gradient norm and learning rate, kept on the device since the last flush (no host sync
    per step)."""

    def __init__(self, capacity: int, device: torch.device, start: int) -> None:
        self.losses = torch.zeros(capacity, device=device)
        self.norms = torch.zeros(capacity, device=device)
        # float64 where the device has it: a group's float lr is logged as set_lr wrote it
        self.lrs = torch.zeros(capacity, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        self.flushed = start  # steps before this one were read back

    def record(self, step: int, loss: torch.Tensor, norm: torch.Tensor, lr: float | torch.Tensor) -> None:
        """`lr`: the rate the optimizer used, a float or a 0-d device tensor (copied on the device)."""
        i = step - self.flushed
        self.losses[i], self.norms[i], self.lrs[i] = loss, norm, lr

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The losses, norms and learning rates of the steps since the last read, up to `end`."""
        n = end - self.flushed
        self.flushed = end
        return self.losses[:n], self.norms[:n], self.lrs[:n]


@dataclass
class Learner:
    """The model and what updates it: optimizers, grad scaler (fp16 only), the training windows' generator and
    the weights' moving average (train.ema)."""

    model: GPT
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batch_rng: torch.Generator
    average: WeightAverage | None

    @classmethod
    def build(
        cls, cfg: Config, vocab_size: int, device: torch.device, dtype: torch.dtype, capturable: bool
    ) -> "Learner":
        """The same initial weights on every rank (seeded with train.seed)."""
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model, vocab_size).to(device)
        optimizers = build_optimizers(model, cfg.train, device, capturable=capturable)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        batch_rng = torch.Generator(device=device)
        batch_rng.manual_seed(cfg.train.seed)
        average = WeightAverage(list(model.parameters()), cfg.train.ema) if cfg.train.ema else None
        return cls(model, optimizers, scaler, batch_rng, average)

    def state(self) -> dict[str, Any]:
        """The ResumeState fields this holds (dropout's RNG included)."""
        device = self.batch_rng.device
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "batch_rng": self.batch_rng.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "average": self.average.average if self.average is not None else None,
        }

    def load(self, state: ResumeState, restore_dropout_rng: bool, capturable: bool) -> None:
        self.model.load_state_dict(state.model)
        for opt, opt_state in zip(self.optimizers, state.optimizers, strict=True):
            opt.load_state_dict(opt_state)
        if capturable:  # load_state_dict put back plain numbers
            use_lr_tensors(self.optimizers, self.batch_rng.device)
        self.scaler.load_state_dict(state.scaler)
        if self.average is not None and state.average is not None:
            self.average.load(state.average)
        self.batch_rng.set_state(state.batch_rng)
        if restore_dropout_rng:
            torch.set_rng_state(state.cpu_rng)
            if state.cuda_rng is not None:
                torch.cuda.set_rng_state(state.cuda_rng, self.batch_rng.device)


class Trainer:
    """Builds the model, optimizers and step from the config (the constructor), restores a resume state,
    then runs the loop: train_step, evaluate, save_resume."""

    def __init__(
        self,
        cfg: Config,
        paths: TrainPaths,
        device: torch.device,
        dtype: torch.dtype,
        dist_info: DistInfo,
        show_progress: bool,
    ) -> None:
        self.cfg, self.paths, self.device, self.dtype, self.dist = cfg, paths, device, dtype, dist_info
        self.started = time.perf_counter() - (runtime.seconds_since_launch() or 0.0)
        self.data = TrainData.load(paths.data_dir, cfg.model.block_size, device)
        train = cfg.train
        self.captured = runtime.captures_step(
            train.compile_mode, device, dtype, dist_info.world_size, cfg.model.gradient_checkpointing
        )
        self.learner = Learner.build(cfg, self.data.tokenizer.vocab_size, device, dtype, self.captured)
        self.model = self.learner.model
        torch.manual_seed(train.seed + dist_info.rank)  # same initial weights on every rank, own dropout
        self.tokens_per_step = train.batch_size * cfg.model.block_size * train.grad_accum_steps * dist_info.world_size
        self.step, self.best_val, self.best_step = 0, math.inf, 0
        self.store = ResumeStore(paths.resume_dir)
        self.key = resume_key(_trajectory_settings(cfg, device, dtype, dist_info.world_size), _data_files(paths))
        tensorboard = paths.tensorboard_dir if train.tensorboard else None
        self.log = RunLog(
            paths.metrics_dir, tensorboard, train.max_iters, self.tokens_per_step, dist_info.is_main, show_progress
        )
        self.restore()
        self.log.progress.message(
            f"{self.model.num_params() / 1e6:.2f}M parameters on {device} ({str(dtype)[6:]}), "
            f"{self.tokens_per_step:,} tokens per step, ready {self.elapsed():.1f} s after launch"
        )
        self.compiled = runtime.resolve_compile(train.compile, device)
        # off the GPU a host check costs nothing: stop before a non-finite update
        check = (
            None if device.type == "cuda" else lambda loss, norm: self._check_finite(self.step, loss[None], norm[None])
        )
        parts = (self.model, self.learner.optimizers, self.learner.scaler, train)
        average = self.learner.average
        self.train_step_fn = build_train_step(*parts, self.compiled, self.captured, dtype, check, average)

    def elapsed(self) -> float:
        """Seconds since the process was launched (plus the time of the runs this one resumes)."""
        return time.perf_counter() - self.started

    def restore(self) -> None:
        """Continue from the resume state made with the same params, data and code, if there is one."""
        state, why = self.store.load(self.key)
        self.log.progress.message(why)
        _check_same_on_all_ranks(state.step if state else 0, self.dist, self.paths.resume_dir)
        if state is None:
            return
        self.learner.load(state, restore_dropout_rng=self.dist.rank == 0, capturable=self.captured)
        if self.dist.rank != 0:  # only rank 0's dropout RNG is saved; the others continue from a seed of their own
            torch.manual_seed(self.cfg.train.seed + self.dist.rank + 1_000_003 * state.step)
        self.step, self.best_val, self.best_step = state.step, state.best_val, state.best_step
        self.log.series = MetricsLog.from_state(state.metrics, self.step)
        self.started -= state.elapsed
        if self.dist.is_main:
            self.store.restore_checkpoint(self.paths.checkpoint)
        self.log.start(self.step)

    def save_resume(self) -> None:
        if not self.dist.is_main:
            return
        series, learned = self.log.series.to_state(), self.learner.state()
        state = ResumeState(self.key, self.step, self.best_val, self.best_step, series, self.elapsed(), **learned)
        self.store.save(state, self.paths.checkpoint if self.best_step else None)

    def run(self) -> dict[str, Any]:
        train = self.cfg.train
        # the series are read back at every evaluation, so they never hold more than eval_interval steps
        self.series = StepSeries(min(train.max_iters, train.eval_interval), self.device, start=self.step)
        self.log.start(self.step)
        with _StopFlag() as stop:
            while self.step < train.max_iters:
                if distributed.any_rank(stop.signum is not None, self.dist):  # all ranks stop at one step
                    self._flush()  # the state's series must reach self.step: the resumed run logs from there
                    self.save_resume()
                    self.log.close()
                    raise Interrupted(stop.signum or signal.SIGTERM, self.step)
                self.train_step()
                if self.step % train.eval_interval == 0 or self.step == train.max_iters:
                    self._flush()
                    self.evaluate()
                if train.resume_interval and self.step % train.resume_interval == 0 and self.step < train.max_iters:
                    self._flush()
                    saving = time.perf_counter()  # saving is not training: keep it out of tokens/s
                    self.save_resume()
                    self.log.pause(time.perf_counter() - saving)
        self.log.close()
        if self.dist.is_main:
            self.store.clear()
        return self.summary()

    def train_step(self) -> None:
        """One optimizer step at the scheduled learning rate, on this rank's share of the step's windows."""
        set_lr(self.learner.optimizers, lr_factor(self.step, self.cfg.train))
        if self.compiled and not self.captured:
            torch.compiler.cudagraph_mark_step_begin()
        train = self.cfg.train
        loss, norm = self.train_step_fn(
            self.data.batches(self.learner.batch_rng, train.batch_size, train.grad_accum_steps, self.dist)
        )
        # the rate the optimizer read (AdamW's, learning_rate's schedule), not a recomputed one
        self.series.record(self.step, loss, norm, self.learner.optimizers[0].param_groups[0]["lr"])
        self.step += 1
        self.log.step(self.step, loss)

    def _flush(self) -> None:
        """Check the steps since the last flush for non-finite values and log their losses (one host sync)."""
        first = self.series.flushed
        losses, norms, lrs = self.series.read(self.step)
        self._check_finite(first, losses, norms)
        # each rank holds the loss of its own share of the batch: log the mean, the whole batch's loss
        values = distributed.all_reduce_sum(losses.clone(), self.dist) / self.dist.world_size
        self.log.train_losses(first, values.tolist(), lrs.tolist())

    def _check_finite(self, first: int, losses: torch.Tensor, norms: torch.Tensor) -> None:
        check_finite(first, losses, norms, self.learner.scaler.is_enabled(), self.paths.checkpoint, self.best_step)

    def evaluate(self) -> None:
        """Loss over the validation split; the checkpoint when it is the best so far; report and write metrics.
        With train.ema, of the weights' moving average."""
        runtime.synchronize(self.device)
        tokens_per_sec = self.log.end_interval(self.step, self.tokens_per_step)
        average = self.learner.average
        with average.applied() if average is not None else contextlib.nullcontext():
            val_loss, val_bpc = self._validate()
        self.log.evaluation(self.step, val_loss, val_bpc, tokens_per_sec)
        self.log.write(self.summary())
        self.log.start(self.step)  # evaluating is not training: the next interval starts now

    def _validate(self) -> tuple[float, float]:
        train = self.cfg.train
        autocast = runtime.autocast(self.device, self.dtype)
        share = (train.eval_iters, self.dist.rank, self.dist.world_size)  # this rank's batches
        total, count = data.evaluate(self.model, self.data.evalset, train.batch_size, autocast, *share)
        total, count = distributed.all_reduce_sum(total, self.dist), distributed.all_reduce_sum(count, self.dist)
        val_loss = float(total / count)
        val_bpc = data.bits_per_char(val_loss, self.data.tokens_per_char)
        self.log.series.val_rows.append((self.step, val_loss, val_bpc, self.elapsed()))
        if not math.isfinite(val_loss):
            raise UserError(
                f"validation loss is non-finite at step {self.step}; training stopped, "
                f"{self.paths.checkpoint} is untouched: lower train.learning_rate"
            )
        if val_loss < self.best_val:
            self.best_val, self.best_step = val_loss, self.step
            if self.dist.is_main:
                save_checkpoint(self.paths.checkpoint, self.model, self.data.tokenizer, self.step, val_loss)
        return val_loss, val_bpc

    def summary(self) -> dict[str, Any]:
        run = (self.best_val, self.best_step, self.step, self.tokens_per_step, self.elapsed())
        return self.log.summary(*run, self.model.num_params(), self.device)


def check_finite(
    first: int, losses: torch.Tensor, norms: torch.Tensor, scaled: bool, checkpoint: Path, best_step: int
) -> None:
    """A UserError naming the first step (counting from `first`) whose loss or gradient norm is not finite.

    With fp16's grad scaler (`scaled`) an infinite gradient is a skipped step, not an error.
    """
    bad = ~torch.isfinite(losses)
    if not scaled:
        bad |= ~torch.isfinite(norms)
    if bad.any():
        step = first + int(bad.nonzero()[0]) + 1
        where = (
            f"the last good checkpoint {checkpoint} (step {best_step}) is untouched"
            if best_step
            else "no checkpoint was written"
        )
        raise UserError(
            f"loss or gradient became non-finite at step {step}; training stopped, {where}: "
            "lower train.learning_rate or use train.dtype=bf16/fp32"
        )


def train_warnings(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Settings that are valid but most likely a mistake, one line each."""
    warnings = []
    if cfg.warmup_iters >= cfg.max_iters:
        warnings.append(
            f"train.warmup_iters ({cfg.warmup_iters}) >= train.max_iters ({cfg.max_iters}): the whole run is "
            "warmup, the learning rate never decays; lower train.warmup_iters"
        )
    if device.type == "cpu" and dtype == torch.float16:
        warnings.append(
            "train.dtype is fp16 on the CPU: slower than fp32 on most CPUs, and less precise; use auto (fp32 here)"
        )
    return warnings


def _check_same_on_all_ranks(resume_step: int, dist: DistInfo, resume_dir: Path) -> None:
    """Every rank must resume from the same step (a host that cannot see rank 0's files would not)."""
    if not distributed.same_on_all_ranks(resume_step, dist):
        raise UserError(
            f"the ranks found different resume states in {resume_dir}: every host must see "
            "the one rank 0 writes (a shared filesystem), or delete it to start over"
        )


def _trajectory_settings(cfg: Config, device: torch.device, dtype: torch.dtype, world_size: int) -> dict[str, Any]:
    """What shapes the training trajectory besides the data: a resume state made with others is not used."""
    return {
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
        "device": device.type,
        "dtype": str(dtype),
        "world_size": world_size,
    }


def _outputs(paths: TrainPaths) -> list[tuple[Path, str]]:
    """The run's outputs, one in each folder it writes (the resume state's is made in the checkpoint's), and what
    each is."""
    return [(paths.checkpoint, "checkpoint"), (paths.metrics_dir / SUMMARY, "metrics")]


def _data_files(paths: TrainPaths) -> list[Path]:
    return [paths.data_dir / name for name in ("train.pt", "val.pt", "vocab.json")]


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
