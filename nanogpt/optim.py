"""Optimizers and the learning-rate schedule (a pure function of the step, so resuming needs only the step)."""

import math

import torch
from torch import nn

from nanogpt.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_iters` steps, then cosine decay to `min_lr` at `max_iters` (nanoGPT's get_lr).
    """
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.max_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr)


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything (decay on matrices only); with `muon`, Muon takes the blocks' hidden matrices.

    Each param group remembers its peak rate as `peak_lr`; `set_lr` scales it by the schedule.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {n for n, p in params.items() if cfg.optimizer == "muon" and p.dim() == 2 and ".blocks." in f".{n}"}
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in hidden]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if hidden:
        optimizers.append(torch.optim.Muon([params[n] for n in sorted(hidden)], lr=cfg.muon_learning_rate,
                                           weight_decay=cfg.weight_decay, momentum=0.95))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * factor
