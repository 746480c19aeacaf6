"""The training loop (`train`) and its named steps (`Trainer`): train_step, evaluate, save_resume.

The evaluator and the resume store each say when they are due. One optimizer step is nanogpt/step.py (the
textbook step, and on a GPU its CUDA-graph replay); the data nanogpt/data.py; the metrics nanogpt/metrics.py; the
resume state's layout and folder nanogpt/checkpoint.py.
"""

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from nanogpt import distributed, files, metrics, runtime
from nanogpt.checkpoint import ModelAndOptimizers, ResumeState, ResumeStore, checkpoint, run_key, write_checkpoint
from nanogpt.config import Config, TrainConfig
from nanogpt.data import TrainData
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError, out_of_memory, warn
from nanogpt.metrics import SUMMARY, Evaluator, MetricsRecorder, NonFinite, check_finite
from nanogpt.model import GPT
from nanogpt.optim import WeightAverage, build_optimizers, lr_factor, set_lr, use_lr_tensors
from nanogpt.step import CapturedStep, build_train_step


@dataclass(frozen=True)
class TrainPaths:
    """The folders and files the train stage reads (data_dir) and writes."""

    data_dir: Path = Path("data")
    checkpoint: Path = Path("out/ckpt.pt")
    resume_dir: Path = Path("out/resume")
    metrics_dir: Path = Path("metrics")
    tensorboard_dir: Path = Path("out/tensorboard")


def train(cfg: Config, paths: TrainPaths = TrainPaths(), show_progress: bool = True) -> dict[str, Any]:
    """Train the model described by `cfg` on the encoded data; return the summary metrics.

    Writes the best-val checkpoint, metric series and summary (main process only), keeps resume state under
    `paths.resume_dir` until the run finishes, and raises Interrupted on SIGINT/SIGTERM.
    """
    device, dtype = _device_and_dtype(cfg, paths)
    dist = distributed.init_from_env(device.type)
    try:
        with out_of_memory(f"building the model on {device}", "lower model.n_embd or model.n_layer"):
            trainer = Trainer(cfg, paths, device, dtype, dist, show_progress)
        training = f"training on {device} with batches of {cfg.train.batch_size} x {cfg.model.block_size} tokens"
        with out_of_memory(training, TOO_BIG), trainer.running(), _StopFlag() as stop:
            while trainer.step < cfg.train.max_iters:
                if distributed.any_rank(stop.signum is not None, dist):  # all ranks stop at one step
                    trainer.save_resume()
                    raise Interrupted(stop.signum or signal.SIGTERM, trainer.step)
                trainer.train_step()
                if trainer.evaluator.due(trainer.step):
                    trainer.evaluate()
                if trainer.resume.due(trainer.step):
                    trainer.save_resume()
        return trainer.finish()
    finally:
        distributed.shutdown(dist)


TOO_BIG = (
    "lower train.batch_size (raising train.grad_accum_steps keeps the tokens per step), model.block_size "
    "or the model's size (model.n_embd, model.n_layer)"
)


class Trainer:
    """One run's parts, built from the config: the data, the model and its optimizers, the step, the evaluator,
    the resume store and the metrics recorder; and the loop's named steps."""

    def __init__(
        self,
        cfg: Config,
        paths: TrainPaths,
        device: torch.device,
        dtype: torch.dtype,
        dist: DistInfo,
        show_progress: bool,
    ) -> None:
        self.cfg, self.dist, self.device, self.checkpoint, train = cfg, dist, device, paths.checkpoint, cfg.train
        self.data = TrainData.load(paths.data_dir, cfg.model.block_size, device)
        self.captured = runtime.captures_step(
            train.compile_mode, device, dtype, dist.world_size, cfg.model.gradient_checkpointing
        )
        self.compiled = runtime.resolve_compile(train.compile, device)
        self.parts = build_model_and_optimizers(cfg, self.data.tokenizer.vocab_size, device, dtype, self.captured)
        torch.manual_seed(train.seed + dist.rank)  # same initial weights on every rank, own dropout
        self.evaluator = Evaluator(train, self.data, runtime.autocast(device, dtype), dist, paths.checkpoint)
        key = run_key(cfg, device, dtype, dist.world_size, TrainData.files(paths.data_dir))
        self.resume = ResumeStore(paths.resume_dir, key, train.resume_interval, train.max_iters)
        tokens_per_step = train.batch_size * cfg.model.block_size * train.grad_accum_steps * dist.world_size
        scaled = self.parts.scaler.is_enabled()
        self.recorder = MetricsRecorder(
            train, paths.metrics_dir, paths.tensorboard_dir, tokens_per_step, device, dist, scaled, show_progress
        )
        self.writes = files.BackgroundWrites()  # the checkpoint and metrics files, off the training thread
        self.step = 0
        self.restore()
        self.recorder.message(
            f"{self.parts.model.num_params() / 1e6:.2f}M parameters on {device} ({str(dtype)[6:]}), "
            f"{tokens_per_step:,} tokens per step, ready {self.recorder.since_launch():.1f} s after launch"
        )
        # off the GPU a host check costs nothing: stop before a non-finite update
        check = None if device.type == "cuda" else self._check_step
        parts = self.parts
        self.step_fn = build_train_step(
            parts.model,
            parts.optimizers,
            parts.scaler,
            train,
            compiled=self.compiled,
            captured=self.captured,
            dtype=dtype,
            check=check,
            average=parts.average,
        )
        self.recorder.start(self.step, _compile_steps(self.compiled, self.captured, train.compile_mode))

    def restore(self) -> None:
        """Continue from the resume state made with the same params, data and code, if there is one."""
        state, why = self.resume.load()
        self.recorder.message(why)
        if not distributed.same_on_all_ranks(state.step if state else 0, self.dist):  # a host without rank 0's files
            raise UserError(
                f"the ranks found different resume states in {self.resume.root}: every host must see "
                "the one rank 0 writes (a shared filesystem), or delete it to start over"
            )
        if state is None:
            return
        self.parts.load(state, restore_dropout_rng=self.dist.rank == 0)
        if self.captured:  # load_state_dict put back plain numbers
            use_lr_tensors(self.parts.optimizers, self.device)
        if self.dist.rank != 0:  # only rank 0's dropout RNG is saved; the others continue from a seed of their own
            torch.manual_seed(self.cfg.train.seed + self.dist.rank + 1_000_003 * state.step)
        self.step = state.step
        self.evaluator.best_val, self.evaluator.best_step = state.best_val, state.best_step
        self.recorder.restore(state.metrics, state.step, state.elapsed)
        if self.dist.is_main:
            self.resume.restore_checkpoint(self.checkpoint)

    def train_step(self) -> None:
        """One optimizer step at the scheduled learning rate, on this rank's share of the step's windows."""
        train = self.cfg.train
        set_lr(self.parts.optimizers, lr_factor(self.step, train))
        if self.compiled and not self.captured:
            torch.compiler.cudagraph_mark_step_begin()
        rank, world_size = self.dist.rank, self.dist.world_size
        batches = self.data.batches(self.parts.batch_rng, train.batch_size, train.grad_accum_steps, rank, world_size)
        loss, norm = self.step_fn(batches)
        self.step += 1
        # the rate the optimizer read (AdamW's, learning_rate's schedule), not a recomputed one
        self.recorder.record_step(self.step, loss, norm, self.parts.optimizers[0].param_groups[0]["lr"])

    def evaluate(self) -> None:
        """The validation loss; the checkpoint when it is the best so far; the metrics shown and written."""
        self.recorder.flush()  # a non-finite step stops the run here, before a checkpoint is written
        runtime.synchronize(self.device)  # the steps' time is training time
        model, average = self.parts.model, self.parts.average
        with self.recorder.paused():
            # with train.ema, of the weights' moving average, which the checkpoint then holds
            with average.applied() if average is not None else contextlib.nullcontext():
                val_loss, val_bpc = self.evaluator.evaluate(model, self.step)
                if self.evaluator.best_step == self.step and self.dist.is_main:  # written while training goes on
                    best = checkpoint(model, self.data.tokenizer, self.step, val_loss)
                    self.writes.submit(write_checkpoint, best, self.checkpoint)
            self.recorder.evaluation(self.step, val_loss, val_bpc)
            self.recorder.write(self.summary(), self.writes)

    def save_resume(self) -> None:
        """The resume state, saved by the main process (every rank reads back its series)."""
        metrics = self.recorder.state()
        with self.recorder.paused():
            self.writes.wait()  # the state links the checkpoint as it is on disk
            if self.dist.is_main:
                best_val, best_step = self.evaluator.best_val, self.evaluator.best_step
                elapsed = self.recorder.elapsed()
                state = ResumeState(
                    self.resume.key, self.step, best_val, best_step, metrics, elapsed, **self.parts.state()
                )
                self.resume.save(state, self.checkpoint if best_step else None)

    def finish(self) -> dict[str, Any]:
        """The run is complete: its resume state goes. The summary metrics."""
        if self.dist.is_main:
            self.resume.clear()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return self.recorder.summary(self.evaluator.best_val, self.evaluator.best_step, self.parts.model.num_params())

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Close the progress display and TensorBoard however the loop ends; a non-finite step is a UserError that
        names the checkpoint it leaves untouched."""
        try:
            yield
        except NonFinite as exc:
            raise exc.user_error(self.checkpoint, self.evaluator.best_step) from None
        finally:
            self.recorder.close()
            self.writes.wait()  # the checkpoint and metrics written so far are on disk when train() returns

    def _check_step(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        check_finite(self.step, loss[None], norm[None], self.recorder.scaled)


def build_model_and_optimizers(
    cfg: Config, vocab_size: int, device: torch.device, dtype: torch.dtype, capturable: bool
) -> ModelAndOptimizers:
    """The model and what updates it, with the same initial weights on every rank (seeded with train.seed)."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, vocab_size).to(device)
    optimizers = build_optimizers(model, cfg.train, device, capturable=capturable)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch_rng = torch.Generator(device=device)
    batch_rng.manual_seed(cfg.train.seed)
    average = WeightAverage(list(model.parameters()), cfg.train.ema) if cfg.train.ema else None
    return ModelAndOptimizers(model, optimizers, scaler, batch_rng, average)


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


def _device_and_dtype(cfg: Config, paths: TrainPaths) -> tuple[torch.device, torch.dtype]:
    """This process's device and precision; before any work, a missing tensorboard or an output that cannot be
    written is a UserError, and (main process) settings that are most likely a mistake are a warning."""
    device = runtime.resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = runtime.resolve_dtype(cfg.train.dtype, device)
    if cfg.train.tensorboard:
        metrics.require_tensorboard()
    if os.environ.get("RANK", "0") == "0":  # the main process writes the outputs and speaks for all
        # one output in each folder the run writes (the resume state's is made beside the checkpoint)
        for path, what in ((paths.checkpoint, "checkpoint"), (paths.metrics_dir / SUMMARY, "metrics")):
            files.check_writable(path, what)  # now, not when the first checkpoint is due
        for warning in train_warnings(cfg.train, device, dtype):
            warn(warning)
    return device, dtype


def train_warnings(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Settings that are valid but most likely a mistake, one line each."""
    warnings = []
    if cfg.warmup_iters >= cfg.max_iters:
        warnings.append(
            f"train.warmup_iters ({cfg.warmup_iters}) >= train.max_iters ({cfg.max_iters}): the whole run is "
            "warmup, the learning rate never decays; lower train.warmup_iters"
        )
    slower = {torch.float16: ("fp16", "slower"), torch.bfloat16: ("bf16", "many times slower")}
    if device.type == "cpu" and dtype in slower:
        name, how = slower[dtype]
        warnings.append(
            f"train.dtype is {name} on the CPU: {how} than fp32 on most CPUs, and less precise; use auto (fp32 here)"
        )
    return warnings


def _compile_steps(compiled: bool, captured: bool, compile_mode: str) -> int:
    """How many first steps of a launch compile or capture: a captured step's eager warm-up steps and its capture;
    torch.compile's first call, and with its own CUDA graphs (reduce-overhead, max-autotune) the recording call."""
    if captured:
        return CapturedStep.WARMUP + 1
    if compiled:
        return 2 if compile_mode in runtime.GRAPH_MODES else 1
    return 0
