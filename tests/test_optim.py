"""The learning-rate schedule (warmup, cosine, floor), how parameters are split between optimizers, and Muon's
update (against torch.optim.Muon, and on a GPU its CUDA graph against its eager step)."""

import copy
import dataclasses
import itertools

import pytest
import torch

from conftest import tiny_config
from nanogpt.config import TrainConfig
from nanogpt.model import GPT
from nanogpt.optim import (
    BatchedMuon,
    build_optimizers,
    lr_factor,
    newton_schulz,
    orthogonalize,
    set_lr,
    use_lr_tensors,
)

TRAIN = tiny_config().train
TINY = tiny_config(
    {"model.block_size": 8, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.dropout": 0.0}
).model


def schedule(warmup: int = 100, max_iters: int = 1100, min_lr: float = 0.1) -> TrainConfig:
    return dataclasses.replace(TRAIN, warmup_iters=warmup, max_iters=max_iters, min_lr=min_lr)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY, 13)


def test_warmup_starts_small_and_rises_linearly():
    cfg = schedule()

    factors = [lr_factor(step, cfg) for step in range(100)]

    assert factors[0] == pytest.approx(1 / 101)
    assert all(b > a for a, b in itertools.pairwise(factors))
    assert factors[-1] < 1.0


def test_peak_is_reached_at_the_end_of_warmup():
    assert lr_factor(100, schedule()) == pytest.approx(1.0)


def test_middle_of_the_cosine_is_halfway_to_the_floor():
    cfg = schedule(min_lr=0.1)

    assert lr_factor(600, cfg) == pytest.approx((1 + 0.1) / 2)


def test_cosine_decays_monotonically_to_min_lr():
    cfg = schedule()

    factors = [lr_factor(step, cfg) for step in range(100, 1101)]

    assert all(b <= a for a, b in itertools.pairwise(factors))
    assert factors[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("step", [1100, 1101, 5000])
def test_at_and_after_max_iters_the_rate_stays_at_min_lr(step):
    assert lr_factor(step, schedule(min_lr=0.1)) == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, schedule(warmup=0)) == pytest.approx(1.0)


def test_adamw_decays_matrices_only():
    model = tiny_model()
    cfg = dataclasses.replace(TRAIN, optimizer="adamw", weight_decay=0.1)

    [adamw] = build_optimizers(model, cfg, torch.device("cpu"))

    for group in adamw.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    grouped = [p for group in adamw.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())
    assert any(p.dim() == 1 for p in grouped)  # the LayerNorm weights are there, undecayed


def test_adamw_takes_its_rate_and_betas_from_the_config():
    # none of them torch's defaults (lr 1e-3, betas 0.9 and 0.999), so that a dropped argument shows
    cfg = dataclasses.replace(TRAIN, optimizer="adamw", learning_rate=3e-3, beta1=0.8, beta2=0.95)

    [adamw] = build_optimizers(tiny_model(), cfg, torch.device("cpu"))

    assert [(g["peak_lr"], g["betas"]) for g in adamw.param_groups] == [(3e-3, (0.8, 0.95))] * 2


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    cfg = dataclasses.replace(TRAIN, optimizer="muon")

    adamw, muon = build_optimizers(model, cfg, torch.device("cpu"))

    assert isinstance(adamw, torch.optim.AdamW)
    assert "Muon" in type(muon).__name__
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = [names[id(p)] for group in muon.param_groups for p in group["params"]]
    in_adamw = [names[id(p)] for group in adamw.param_groups for p in group["params"]]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every parameter exactly once
    assert len(set(in_muon + in_adamw)) == len(names)
    assert in_muon and all(n.startswith("blocks.") and model.get_parameter(n).dim() == 2 for n in in_muon)
    assert "wte.weight" in in_adamw and "wpe.weight" in in_adamw
    assert muon.param_groups[0]["lr"] == cfg.muon_learning_rate


def test_muon_and_adamw_steps_update_every_parameter():
    model = tiny_model()
    optimizers = build_optimizers(model, dataclasses.replace(TRAIN, optimizer="muon"), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randint(13, (4, 8), generator=torch.Generator().manual_seed(0))

    _, loss = model(x, x)
    loss.backward()
    for opt in optimizers:
        opt.step()

    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_muon_steps_match_torch_optim_muon():
    # torch.optim.Muon orthogonalizes in bfloat16 even on the CPU: the two agree to bfloat16 precision
    model = tiny_model()
    reference = copy.deepcopy(model)
    cfg = dataclasses.replace(TRAIN, optimizer="muon")
    muon = build_optimizers(model, cfg, torch.device("cpu"))[1]
    hidden = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    torch_muon = torch.optim.Muon(
        [reference.get_parameter(n) for n in hidden],
        lr=cfg.muon_learning_rate,
        weight_decay=cfg.weight_decay,
        momentum=0.95,
    )
    start = {n: model.get_parameter(n).detach().clone() for n in hidden}
    data = torch.Generator().manual_seed(0)

    for _ in range(3):
        x = torch.randint(13, (4, 8), generator=data)
        for m, opt in ((model, muon), (reference, torch_muon)):
            m.zero_grad()
            m(x, x)[1].backward()
            opt.step()

    for n in hidden:
        ours = model.get_parameter(n).detach() - start[n]
        theirs = reference.get_parameter(n).detach() - start[n]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.1 * theirs.abs().max().item(), msg=n)
        assert torch.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.99, n


@pytest.mark.gpu
def test_muon_cuda_graph_steps_match_eager_steps():
    """BatchedMuon(cuda_graph=True) steps eagerly twice, captures the third step and replays it from then on: the
    parameters after every step are the eager update's, with a rate that changes each step and gradients that
    are new tensors each step (as after zero_grad(set_to_none=True): the graph copies them in)."""
    shapes = [(32, 16), (32, 16), (16, 32), (24, 24)]  # two tall ones batched together, a wide one, a square one
    rates = [0.02, 0.01, 0.03, 0.0, 0.05, 0.02, 0.04]  # 0 after the capture: a rate baked into the graph shows
    g = torch.Generator(device="cuda").manual_seed(0)
    start = [0.1 * torch.randn(shape, device="cuda", generator=g) for shape in shapes]
    grads = [[torch.randn(shape, device="cuda", generator=g) for shape in shapes] for _ in rates]
    after: dict[bool, list[list[torch.Tensor]]] = {}  # the parameters after each step, eager and graph
    for cuda_graph in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        muon = BatchedMuon(params, lr=0.02, weight_decay=0.1, cuda_graph=cuda_graph)
        after[cuda_graph] = []
        for lr, step_grads in zip(rates, grads, strict=True):
            muon.param_groups[0]["lr"] = lr
            for p, grad in zip(params, step_grads, strict=True):
                p.grad = grad.clone()
            muon.step()
            after[cuda_graph].append([p.detach().clone() for p in params])
        assert (muon._graph is not None) is cuda_graph  # the last steps were replays: graph against eager

    # Equal in practice: the replay runs the eager step's kernels on the same values. The tolerance allows for
    # Newton-Schulz's bf16 products rounding differently, should cuBLAS pick another algorithm under capture (2^-8
    # of an update whose entries reach 0.04 at rate 0.05), and is 25 times smaller than the largest entry of one
    # step at rate 0.01 (0.005 to 0.008, measured): a step lost, repeated or taken at another rate fails.
    for step, (eager, graph) in enumerate(zip(after[False], after[True], strict=True)):
        for a, b in zip(eager, graph, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=2e-4, msg=f"step {step}")
    assert all(torch.equal(a, b) for a, b in zip(after[True][2], after[True][3], strict=True))  # the step at rate 0


def test_set_lr_scales_each_groups_peak():
    model = tiny_model()
    cfg = dataclasses.replace(TRAIN, optimizer="muon")
    optimizers = build_optimizers(model, cfg, torch.device("cpu"))

    set_lr(optimizers, 0.5)

    adamw, muon = optimizers
    assert all(g["lr"] == pytest.approx(cfg.learning_rate * 0.5) for g in adamw.param_groups)
    assert all(g["lr"] == pytest.approx(cfg.muon_learning_rate * 0.5) for g in muon.param_groups)


def test_a_matrix_alone_in_its_shape_steps_as_torch_optim_muon_does():
    """A one-layer model has one matrix of each shape. BatchedMuon's defaults are torch.optim.Muon's; in bfloat16
    they agree to its precision (as above). The matrix is tall, which Newton-Schulz transposes."""
    start = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    muon = BatchedMuon([ours], lr=0.02, weight_decay=0.1)
    torch_muon = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    grads = torch.Generator().manual_seed(1)

    for _ in range(3):
        ours.grad = torch.randn(8, 4, generator=grads)
        theirs.grad = ours.grad.clone()
        muon.step()
        torch_muon.step()

    ours_moved, theirs_moved = ours.detach() - start, theirs.detach() - start
    torch.testing.assert_close(ours_moved, theirs_moved, rtol=0, atol=0.1 * theirs_moved.abs().max().item())
    assert torch.cosine_similarity(ours_moved.flatten(), theirs_moved.flatten(), dim=0) > 0.99


def test_muon_resumed_from_its_state_dict_steps_as_the_one_that_went_on():
    """Resuming restores the momentum: the next step matches the uninterrupted optimizer's exactly."""
    grads = [torch.randn(6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first = torch.nn.Parameter(torch.zeros(6, 6))
    muon = BatchedMuon([first], lr=0.02, weight_decay=0.0)
    for grad in grads[:2]:
        first.grad = grad
        muon.step()
    resumed = torch.nn.Parameter(first.detach().clone())
    restored = BatchedMuon([resumed], lr=0.02, weight_decay=0.0)

    restored.load_state_dict(copy.deepcopy(muon.state_dict()))  # as from a file: tensors of its own
    for p, opt in ((first, muon), (resumed, restored)):
        p.grad = grads[2]
        opt.step()

    assert torch.equal(resumed, first)


def test_rates_held_in_tensors_step_as_numbers_do():
    """A captured step (nanogpt/step.py) reads its rates from tensors, which set_lr must fill in place."""
    model = tiny_model()
    twin = copy.deepcopy(model)
    cfg = dataclasses.replace(TRAIN, optimizer="muon")
    numbers = build_optimizers(model, cfg, torch.device("cpu"))
    tensors = build_optimizers(twin, cfg, torch.device("cpu"))
    use_lr_tensors(tensors, torch.device("cpu"))
    captured = [g["lr"] for opt in tensors for g in opt.param_groups]
    x = torch.randint(13, (4, 8), generator=torch.Generator().manual_seed(0))

    for m, optimizers in ((model, numbers), (twin, tensors)):
        set_lr(optimizers, 0.5)
        m(x, x)[1].backward()
        for opt in optimizers:
            opt.step()

    assert all(g["lr"] is lr for g, lr in zip((g for opt in tensors for g in opt.param_groups), captured, strict=True))
    assert [lr.item() for lr in captured] == pytest.approx([cfg.learning_rate / 2] * 2 + [cfg.muon_learning_rate / 2])
    for ours, theirs in zip(twin.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_matrices_padded_into_one_batch_orthogonalize_as_each_alone():
    """orthogonalize runs a GPT's four shapes of hidden matrix as one zero-padded batch; each result is the one
    newton_schulz gives its batch alone (float32 on the CPU: equal to rounding)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 8), (8, 8), (32, 8), (8, 32), (6, 5)]  # like c_attn, attn c_proj, c_fc, mlp c_proj; and another side
    batches = [torch.randn(3, *shape, generator=g) for shape in shapes]

    together = orthogonalize(batches, steps=5)

    for batch, ortho in zip(batches, together, strict=True):
        assert ortho.shape == batch.shape
        torch.testing.assert_close(ortho, newton_schulz(batch, steps=5), rtol=0, atol=1e-5)
