"""Optimizers, the learning-rate schedule (a pure function of the step, so resuming needs only the step) and the
moving average of the weights."""

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from nanogpt.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_iters` steps, then a decay to `min_lr` at `max_iters`: `cosine` from the end of
    the warmup (nanoGPT's get_lr), or `wsd` (warmup-stable-decay) linear over the last `cooldown` of the steps,
    the rate held at its peak before.
    """
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.max_iters:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.cooldown * cfg.max_iters))
        progress = max(0.0, (step - (cfg.max_iters - decay_steps)) / decay_steps)
        return 1.0 - progress * (1.0 - cfg.min_lr)
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr)


def build_optimizers(
    model: nn.Module, cfg: TrainConfig, device: torch.device, capturable: bool = False
) -> list[torch.optim.Optimizer]:
    """AdamW for everything (decay on matrices only); with `muon`, Muon takes the blocks' hidden matrices.

    Each param group remembers its peak rate as `peak_lr`; `set_lr` scales it by the schedule. `capturable`:
    the caller captures whole steps in a CUDA graph (nanogpt/step.py), so the optimizers must be safe to
    capture and read their learning rates from device tensors (`use_lr_tensors`).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {n for n, p in params.items() if cfg.optimizer == "muon" and p.dim() == 2 and ".blocks." in f".{n}"}
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in hidden]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
        capturable=capturable,
    )
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if hidden:
        optimizers.append(
            BatchedMuon(
                [params[n] for n in sorted(hidden)],
                lr=cfg.muon_learning_rate,
                weight_decay=cfg.weight_decay,
                momentum=0.95,
                cuda_graph=device.type == "cuda" and not capturable,  # a graph cannot hold its own
            )
        )
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    if capturable:
        use_lr_tensors(optimizers, device)
    return optimizers


def use_lr_tensors(optimizers: list[torch.optim.Optimizer], device: torch.device) -> None:
    """Hold each group's learning rate in a tensor on `device`, so that a captured step reads the value that
    `set_lr` wrote before the replay, not the one at capture (again after a `load_state_dict`, which puts back
    the saved values)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Set every group's learning rate to `factor` times its peak (in place where it is a tensor)."""
    for opt in optimizers:
        for group in opt.param_groups:
            lr = group["peak_lr"] * factor
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


class WeightAverage:
    """An exponential moving average of the parameters, updated after every optimizer step:
    `average += (1 - decay) * (param - average)`. Evaluating the average instead of the last weights smooths out
    the noise of the last steps. The update is plain tensor code, so a captured step (nanogpt/step.py) holds it.
    """

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, self.params, 1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the parameters (in place: their storage stays where a CUDA graph expects it)."""
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, current)

    def load(self, average: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.average, [a.to(p.device) for a, p in zip(average, self.average, strict=True)])


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, 5 Newton-Schulz steps, Keller Jordan's lr scaling),
    run on all matrices at once (`orthogonalize`), and with `cuda_graph` replayed as one CUDA graph.

    torch.optim.Muon orthogonalizes one matrix at a time, in many small kernels per matrix, which leaves a
    GPU waiting on the host (BENCHMARKS.md). Batching the products and replaying the update as a graph
    removes the launch overhead; the arithmetic is the same. The graph works on copies of the gradients,
    so callers may free them between steps (`zero_grad(set_to_none=True)`). Without `cuda_graph` the
    update is plain tensor code that a caller's own CUDA graph can capture (its lr then a tensor).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        weight_decay: float,
        momentum: float = 0.95,
        ns_steps: int = 5,
        cuda_graph: bool = False,
    ) -> None:
        if any(p.dim() != 2 for p in params):
            raise ValueError("BatchedMuon handles 2-D matrices only")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "ns_steps": ns_steps})
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0
        device = self.param_groups[0]["params"][0].device
        self._lr = torch.zeros((), device=device)  # per-step values as tensors, so a graph can read them
        self._decay = torch.zeros((), device=device)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._graph = None  # the graph points at the buffers that were just replaced

    # (type: ignore: Optimizer.step also takes a closure that re-evaluates the loss; the training loop passes none)
    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        (group,) = self.param_groups
        _assign(self._lr, group["lr"])
        _assign(self._decay, 1 - group["lr"] * group["weight_decay"])
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self._graph is None and self.cuda_graph and self._eager_steps >= 2 and len(params) == len(group["params"]):
            self._grads = [g.clone() for g in grads]
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._update(group, params, self._grads)
        if self._graph is not None:
            torch._foreach_copy_(self._grads, grads)
            self._graph.replay()
            return
        self._update(group, params, grads)
        self._eager_steps += 1

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, bufs, group["momentum"])  # Nesterov
        by_shape: dict[torch.Size, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(p.shape, []).append(i)
        shapes = list(by_shape)
        orthos = orthogonalize([torch.stack([updates[i] for i in by_shape[s]]) for s in shapes], group["ns_steps"])
        torch._foreach_mul_(params, self._decay)
        for shape, ortho in zip(shapes, orthos, strict=True):
            same = [params[i] for i in by_shape[shape]]
            step = ortho.to(same[0].dtype).contiguous()
            step.mul_(self._lr * -math.sqrt(max(1.0, shape[0] / shape[1])))
            torch._foreach_add_(same, list(step.unbind(0)))


def _assign(target: torch.Tensor, value: float | torch.Tensor) -> None:
    """Write a number or a 0-d tensor into `target` (a device copy, which a CUDA graph can capture)."""
    if isinstance(value, torch.Tensor):
        target.copy_(value)
    else:
        target.fill_(value)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs, as torch.optim.Muon; float32 on CPUs, where bfloat16 products are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize each matrix of the batch `g` (n, rows, cols), in newton_schulz_dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(newton_schulz_dtype(g.device))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalize(batches: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """newton_schulz of each batch (n_i, rows_i, cols_i), the batches that share their shorter side run as one.

    A GPT's hidden matrices all have n_embd as their shorter side, so one batch takes them all: each laid wide
    (a tall one transposed) and padded with zero columns to the widest. The padding changes nothing: zero columns
    add nothing to the Gram matrix X Xᵀ or to the norm, and stay zero through every iteration. A few large
    products instead of many small ones, which leave a GPU waiting (BENCHMARKS.md).
    """
    tall = [b.size(-2) > b.size(-1) for b in batches]
    wide = [b.mT if t else b for b, t in zip(batches, tall, strict=True)]
    together: dict[int, list[int]] = {}  # shorter side -> the batches that have it
    for i, w in enumerate(wide):
        together.setdefault(w.size(-2), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for rows, index in together.items():
        sizes = [len(wide[i]) for i in index]
        width = max(wide[i].size(-1) for i in index)
        device = batches[index[0]].device
        padded = torch.zeros(sum(sizes), rows, width, dtype=newton_schulz_dtype(device), device=device)
        for piece, i in zip(padded.split(sizes), index, strict=True):
            piece[..., : wide[i].size(-1)] = wide[i]
        for done, i in zip(newton_schulz(padded, steps).split(sizes), index, strict=True):
            columns = done[..., : wide[i].size(-1)]  # batch i's own columns, the padding cut off
            out[i] = columns.mT if tall[i] else columns
    return [out[i] for i in range(len(batches))]
