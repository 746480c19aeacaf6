"""One optimizer step: forward and backward over the step's micro-batches, gradient clipping, the update.

`TrainStep` is the textbook step. On a GPU, `CapturedStep` records that same step once as a CUDA graph and
replays it every step after: one launch instead of hundreds of small kernels, so the GPU never waits for
Python, and no compiler is needed for it (BENCHMARKS.md has the numbers). The training loop calls either
one the same way.
"""

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from nanogpt import runtime
from nanogpt.config import TrainConfig
from nanogpt.model import GPT
from nanogpt.optim import WeightAverage

Batch = tuple[Tensor, Tensor]  # inputs and next-token targets, (B, T) each
Forward = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]  # (x, y) -> (logits, loss)


def build_train_step(
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    *,
    compiled: bool,
    captured: bool,
    dtype: torch.dtype,
    check: Callable[[Tensor, Tensor], None] | None = None,
    average: WeightAverage | None = None,
) -> "TrainStep | CapturedStep":
    """The optimizer step the config asks for: eager or torch.compiled, data-parallel when torch.distributed
    is initialised (torchrun), and captured as one CUDA graph when `captured` (runtime.captures_step)."""
    device = model.device
    ddp = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.nn.parallel import DistributedDataParallel  # imports all of torch.distributed: seconds

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward: Forward = ddp or model
    if compiled:  # a captured step is one CUDA graph already: compile it without torch.compile's own
        forward = runtime.compile(forward, mode=runtime.GRAPH_MODES[cfg.compile_mode] if captured else cfg.compile_mode)
    step = TrainStep(
        forward,
        model,
        optimizers,
        scaler,
        runtime.autocast(device, dtype, cache=not captured),
        cfg.grad_clip,
        check=check,
        no_sync=ddp.no_sync if ddp is not None else None,
        free_grads=not captured,
        average=average,
    )
    if not captured:
        return step
    return CapturedStep(step, cfg.grad_accum_steps, cfg.batch_size, model.cfg.block_size)


class TrainStep:
    """Gradients of the mean loss over the micro-batches, clipped to `grad_clip` (0: off), then one update
    of every optimizer. Returns the mean loss and the gradient norm before clipping, as device tensors.

    `check(loss, norm)`, when given, runs between the gradients and the update: it may raise to stop before
    a bad update. `no_sync` (DDP's) skips the gradient all-reduce on all but the last micro-batch.
    `free_grads=False` zeroes the gradients in place instead of freeing them (a captured step needs them
    at fixed addresses). `average`, when given, is updated after every update.
    """

    def __init__(
        self,
        forward: Forward,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        scaler: torch.amp.GradScaler,
        autocast: contextlib.AbstractContextManager,
        grad_clip: float,
        check: Callable[[Tensor, Tensor], None] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        free_grads: bool = True,
        average: WeightAverage | None = None,
    ) -> None:
        self.forward, self.optimizers, self.scaler, self.autocast = forward, optimizers, scaler, autocast
        self.params = list(model.parameters())
        self.max_norm = grad_clip or math.inf
        self.check, self.no_sync, self.free_grads, self.average = check, no_sync, free_grads, average

    def __call__(self, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        loss, norm = self.gradients(batches)
        if self.check is not None:
            self.check(loss, norm)
        self.update()
        return loss, norm

    def gradients(self, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        """Backward of the mean loss over `batches` (gradient accumulation); the loss and the clipped norm."""
        total = torch.zeros((), device=self.params[0].device)
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    _, loss = self.forward(x, y)
                assert loss is not None  # forward returns a loss whenever it is given targets
                self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach()
        if self.scaler.is_enabled():
            self._overflow_everywhere()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        return total / len(batches), norm

    def _overflow_everywhere(self) -> None:
        """fp16: an overflowing gradient anywhere makes every gradient NaN, so that the grad scaler skips every
        optimizer's step (it decides per optimizer: one whose own gradients are finite would step, and on
        gradients that clipping by an infinite norm zeroes, on its momentum alone). On the device, no host sync."""
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        torch._foreach_mul_(grads, torch.where(finite, 1.0, math.nan))

    def update(self) -> None:
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=self.free_grads)
        if self.average is not None:
            self.average.update()


class CapturedStep:
    """A TrainStep recorded once as a CUDA graph and replayed for every step after.

    A graph replays fixed kernels on fixed memory, so what changes between steps must live in tensors it
    reads: the batches are copied into static buffers, the gradients stay allocated (`free_grads=False`),
    the learning rates are device tensors (`optim.use_lr_tensors`), and autocast keeps no cache of cast
    weights. Dropout's random numbers come from PyTorch's graph-safe generator, which advances at each
    replay. The first WARMUP steps run eagerly: they create the optimizers' state and give torch.compile,
    when it is on, its first calls before the capture.
    """

    WARMUP = 2

    def __init__(self, step: TrainStep, micro_steps: int, batch_size: int, block_size: int) -> None:
        device = step.params[0].device
        self.step, self.device = step, device
        self.x = torch.zeros(micro_steps, batch_size, block_size, dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def __call__(self, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        for i, (x, y) in enumerate(batches):
            self.x[i].copy_(x)
            self.y[i].copy_(y)
        if self.eager_steps < self.WARMUP:
            self._step()
            self.eager_steps += 1
        else:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.replay()
        return self.loss, self.norm

    def _step(self) -> None:
        loss, norm = self.step(list(zip(self.x, self.y, strict=True)))
        self.loss.copy_(loss)
        self.norm.copy_(norm)

    def _capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
            stream = torch.cuda.Stream()  # captures run on a side stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.capture_begin()
                self._step()
                graph.capture_end()
            torch.cuda.current_stream().wait_stream(stream)
        return graph
