"""One optimizer step (nanogpt/step.py): gradient accumulation, fp16 with the grad scaler, and on a GPU the
captured step's equality with the eager one; and when the step is captured at all (nanogpt/runtime.py)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import cuda_devices, tiny_config
from nanogpt import runtime
from nanogpt.config import ModelConfig
from nanogpt.model import GPT
from nanogpt.optim import build_optimizers, set_lr
from nanogpt.step import CapturedStep, TrainStep, build_train_step
from nanogpt.train import check_finite


def model_config(dropout: float = 0.0) -> ModelConfig:
    return tiny_config(
        {"model.block_size": 16, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.dropout": dropout}
    ).model


MODEL = model_config()
TRAIN = tiny_config(
    {
        "train.batch_size": 4,
        "train.max_iters": 10,
        "train.warmup_iters": 2,
        "train.optimizer": "muon",
        "train.eval_interval": 5,
        "train.eval_iters": None,
        "train.resume_interval": 0,
        "train.seed": 0,
    }
).train
VOCAB = 11


def model_and_step(device: str, captured: bool = False, dropout: float = 0.0) -> tuple[GPT, TrainStep | CapturedStep]:
    torch.manual_seed(0)
    model = GPT(model_config(dropout), VOCAB).to(device)
    optimizers = build_optimizers(model, TRAIN, torch.device(device), capturable=captured)
    scaler = torch.amp.GradScaler(device.split(":", maxsplit=1)[0], enabled=False)
    dtype = torch.float32
    return model, build_train_step(model, optimizers, scaler, TRAIN, False, captured, dtype)


def batch(n: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(VOCAB, (n, MODEL.block_size + 1), generator=g)
    return window[:, :-1].to(device), window[:, 1:].to(device)


def test_two_micro_batches_give_the_step_of_one_batch_twice_the_size():
    x, y = batch(8, seed=1)
    whole_model, whole = model_and_step("cpu")
    split_model, split = model_and_step("cpu")

    loss_whole, norm_whole = whole([(x, y)])
    loss_split, norm_split = split([(x[:4], y[:4]), (x[4:], y[4:])])

    assert loss_split == pytest.approx(float(loss_whole), rel=1e-6)
    assert norm_split == pytest.approx(float(norm_whole), rel=1e-5)
    for a, b in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_check_runs_before_the_update_and_can_stop_it():
    model, step = model_and_step("cpu")
    assert isinstance(step, TrainStep)
    before = [p.detach().clone() for p in model.parameters()]

    def refuse(loss: torch.Tensor, norm: torch.Tensor) -> None:
        raise RuntimeError("stop")

    step.check = refuse
    with pytest.raises(RuntimeError, match="stop"):
        step([batch(4, seed=2)])

    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("compile_mode", "dtype", "world_size", "checkpointing", "captured"),
    [
        ("reduce-overhead", torch.bfloat16, 1, False, True),
        ("max-autotune", torch.float32, 1, False, True),
        ("default", torch.bfloat16, 1, False, False),  # no CUDA graphs asked for
        ("reduce-overhead", torch.float16, 1, False, False),  # the grad scaler checks overflow on the host
        ("reduce-overhead", torch.bfloat16, 2, False, False),  # data parallel: torch.compile's own graphs
        ("reduce-overhead", torch.bfloat16, 1, True, False),  # checkpointing saves RNG states on the host
    ],
)
def test_when_the_whole_step_is_captured(compile_mode, dtype, world_size, checkpointing, captured):
    assert runtime.captures_step(compile_mode, CUDA, dtype, world_size, checkpointing) is captured
    assert runtime.captures_step(compile_mode, torch.device("cpu"), dtype, world_size, checkpointing) is False


def test_auto_compiles_on_cuda_under_linux_captured_or_not():
    assert runtime.resolve_compile("auto", CUDA) is sys.platform.startswith("linux")
    assert runtime.resolve_compile(False, CUDA) is False
    assert runtime.resolve_compile(True, torch.device("cpu")) is True
    assert runtime.resolve_compile("auto", torch.device("cpu")) is False


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_captured_step_trains_like_the_eager_step(dropout):
    """The same weights, batches and learning rates: the replayed graph computes the eager step's losses."""
    device = "cuda"
    eager_model, eager = model_and_step(device, dropout=dropout)
    captured_model, captured = model_and_step(device, captured=True, dropout=dropout)
    assert isinstance(captured, CapturedStep)
    eager_opts = eager.optimizers
    captured_opts = captured.step.optimizers
    losses: dict[str, list[float]] = {"eager": [], "captured": []}
    for name, step, opts in (("eager", eager, eager_opts), ("captured", captured, captured_opts)):
        torch.manual_seed(5)  # dropout's random numbers: the same stream for both
        torch.cuda.manual_seed(5)
        for i in range(6):  # 2 eager warm-up steps, the capture, then replays
            set_lr(opts, 0.5 + 0.1 * i)
            loss, _ = step([batch(4, seed=10 + i, device=device)])
            losses[name].append(float(loss))
    assert captured.graph is not None
    torch.testing.assert_close(losses["captured"], losses["eager"], rtol=1e-5, atol=1e-5)
    for a, b in zip(eager_model.parameters(), captured_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", *cuda_devices()])
def test_fp16_steps_train_and_an_overflowing_step_is_skipped(device):
    """fp16 autocast with the grad scaler, through the eager TrainStep (fp16 is never captured: the scaler reads
    its overflow check on the host). The steps train at the default scale. A scale so high that the backward
    overflows (every gradient infinite or NaN) gives a step that neither optimizer takes and the training loop
    lets pass, and halves the scale; the scale then backs off until the gradients fit, and the steps train again."""
    torch.manual_seed(0)
    model = GPT(MODEL, VOCAB).to(device)
    scaler = torch.amp.GradScaler(device.split(":", maxsplit=1)[0])
    optimizers = build_optimizers(model, TRAIN, torch.device(device))
    step = build_train_step(model, optimizers, scaler, TRAIN, False, False, torch.float16)
    x, y = batch(8, seed=3, device=device)  # the same batch at every step, so its loss must fall

    losses = [float(step([(x, y)])[0]) for _ in range(8)]

    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.1  # 2.42 to 2.11 on the CPU
    assert scaler.get_scale() == 2.0**16  # the initial scale: no step overflowed, each one updated

    scaler.update(2.0**32)  # the loss's gradient per logit becomes ~2^25, far past fp16's largest 65504
    before = [p.detach().clone() for p in model.parameters()]
    loss, norm = step([(x, y)])

    assert torch.isfinite(loss) and not torch.isfinite(norm)
    check_finite(9, loss[None], norm[None], scaled=True, checkpoint=Path("ckpt.pt"), best_step=0)  # no error
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**31

    for _ in range(24):  # 13 more overflows on the CPU, then steps that train
        last, _ = step([(x, y)])
    assert float(last) < float(loss) - 0.05


def test_an_infinite_gradient_in_one_optimizers_parameters_skips_the_whole_step():
    """A weight gradient can overflow fp16 on its own (it did in the back-off of the test above, on the CPU: the
    loss rose on steps whose norm was infinite). Here one of Muon's matrices gets an infinite gradient: GradScaler
    decides per optimizer, so without TrainStep._overflow_everywhere AdamW, whose gradients were finite, would
    step on gradients that clip_grad_norm_ multiplies by 0 (max_norm / inf): on its momentum and weight decay."""
    torch.manual_seed(0)
    model = GPT(MODEL, VOCAB)
    scaler = torch.amp.GradScaler("cpu")
    optimizers = build_optimizers(model, TRAIN, torch.device("cpu"))
    step = build_train_step(model, optimizers, scaler, TRAIN, False, False, torch.float16)
    x, y = batch(8, seed=3)
    for _ in range(3):  # momentum in both optimizers
        step([(x, y)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    hook = model.blocks[0].mlp.c_fc.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    step([(x, y)])
    hook.remove()

    assert scaler.get_scale() == 2.0**15  # the scaler saw the overflow
    assert [name for name, p in model.named_parameters() if not torch.equal(p, before[name])] == []
