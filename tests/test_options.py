"""The architecture and training options (model.rope, qk_norm, mlp, tie_embeddings; train.schedule, ema):
what each computes, and that each keeps the KV cache, generation, int8 sampling and the checkpoint exact."""

import contextlib
import copy
import dataclasses
import itertools
import math
from typing import Any

import pytest
import torch

from conftest import cuda_devices, tiny_config
from nanogpt import quantize
from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.config import ModelConfig, TrainConfig, config_from_dict
from nanogpt.errors import UserError
from nanogpt.generate import generate, new_kv_cache
from nanogpt.model import GPT, NANOGPT_ARCHITECTURE, KVCache, Rotary, relu_squared
from nanogpt.optim import WeightAverage, lr_factor
from nanogpt.quantize import quantize_int8
from nanogpt.sampling import SamplingParams, generate_reference
from nanogpt.step import TrainStep
from nanogpt.tokenizer import CharTokenizer

VOCAB = 11
BASE = ModelConfig(
    block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, gradient_checkpointing=False, **NANOGPT_ARCHITECTURE
)
OPTIONS = {
    "rope": {"rope": True},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "untied": {"tie_embeddings": False},
    "all": {"rope": True, "qk_norm": True, "mlp": "relu2", "tie_embeddings": False},
}
DEVICES = ["cpu", *cuda_devices()]  # the CUDA ones marked gpu: there the Triton decode kernel


def model_with(options: dict, seed: int = 0) -> GPT:
    """A small model with the options on, its weights scaled up so that its next-token distributions are far from
    uniform (GPT-2's init gives near-ties, which would hide a wrong logit behind an unchanged argmax)."""
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(BASE, **options), VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- what each option computes


def test_rotary_keeps_each_vector_length():
    rotary = Rotary(head_size=8, block_size=16)
    x = torch.randn(2, 3, 16, 8)

    rotated = rotary(x, torch.arange(16))

    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])  # position 0: no rotation


def test_rotary_query_key_products_depend_on_the_distance_only():
    rotary = Rotary(head_size=8, block_size=32)
    q, k = torch.randn(8), torch.randn(8)

    def product(i: int, j: int) -> torch.Tensor:
        def at(x: torch.Tensor, pos: int) -> torch.Tensor:
            return rotary(x.view(1, 1, 1, 8), torch.tensor([pos])).flatten()

        return at(q, i) @ at(k, j)

    torch.testing.assert_close(product(7, 3), product(20, 16))
    torch.testing.assert_close(product(3, 3), product(30, 30))
    assert not torch.allclose(product(7, 3), product(7, 4))


def test_rope_replaces_the_learned_positions():
    plain, rope = GPT(BASE, VOCAB), GPT(dataclasses.replace(BASE, rope=True), VOCAB)

    assert rope.wpe is None
    assert plain.num_params() - rope.num_params() == BASE.block_size * BASE.n_embd
    assert "blocks.0.attn.rotary.cos" not in rope.state_dict()  # computed, not learned: not in checkpoints


class AttentionInputs(KVCache):
    """A KVCache that keeps the queries and keys each layer attends with."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        self.seen.append((q, k))
        return super().attend(layer, q, k, v, input_pos)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_gives_queries_and_keys_unit_rms(qk_norm):
    model = GPT(dataclasses.replace(BASE, qk_norm=qk_norm), VOCAB)
    cache = AttentionInputs(model.cfg, 2, torch.float32, torch.device("cpu"))

    with torch.no_grad():
        model(tokens(2, 4), input_pos=torch.arange(4), kv_cache=cache)

    assert len(cache.seen) == BASE.n_layer
    for q, k in cache.seen:
        for x in (q, k):
            unit = torch.allclose(x.pow(2).mean(-1), torch.ones(2, BASE.n_head, 4), rtol=1e-4, atol=1e-4)
            assert unit == qk_norm


def test_relu_squared():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])

    assert relu_squared(x).tolist() == [0.0, 0.0, 0.0, 0.25, 9.0]


def test_the_mlp_uses_the_configured_activation():
    gelu, relu2 = GPT(BASE, VOCAB).blocks[0].mlp, GPT(dataclasses.replace(BASE, mlp="relu2"), VOCAB).blocks[0].mlp
    relu2.load_state_dict(gelu.state_dict())
    x = torch.randn(3, BASE.n_embd)

    torch.testing.assert_close(relu2(x), relu2.c_proj(relu_squared(relu2.c_fc(x))))
    assert not torch.allclose(relu2(x), gelu(x))


def test_an_untied_head_has_its_own_weights():
    tied, untied = GPT(BASE, VOCAB), GPT(dataclasses.replace(BASE, tie_embeddings=False), VOCAB)

    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == VOCAB * BASE.n_embd


def test_nanogpt_architecture_is_the_plain_model():
    model = GPT(BASE, VOCAB)

    assert model.wpe is not None and model.lm_head.weight is model.wte.weight
    assert all(block.attn.rotary is None and not block.attn.qk_norm for block in model.blocks)


# ---------------------------------------------------------------- exactness with every option


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@torch.no_grad()
def test_kv_cache_decode_matches_a_full_forward(options, device):
    model = model_with(options).to(device)
    x = tokens(3, 16).to(device)
    full, _ = model(x)

    cache = new_kv_cache(model, batch_size=3)  # on a GPU the fused kernel's
    logits, _ = model(x[:, :5], input_pos=torch.arange(5, device=device), kv_cache=cache)
    steps = [logits[:, -1]]
    for pos in range(5, 16):
        logits, _ = model(x[:, pos : pos + 1], input_pos=torch.tensor([pos], device=device), kv_cache=cache)
        steps.append(logits[:, -1])

    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_changing_a_token_changes_no_earlier_logit(options):
    model = model_with(options)
    x = tokens(1, 16)
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % VOCAB

    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]

    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9], b[:, 9])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("params", [SamplingParams(0.0, None, None), SamplingParams(1.0, 5, None)], ids=["greedy", "k"])
def test_cached_generation_matches_the_reference(options, device, params):
    model = model_with(options).to(device)

    cached = generate(model, [1, 2, 3], 40, 1, params, seed=3)  # past block_size 16: the window slides
    reference = generate_reference(model, [1, 2, 3], 40, 1, params, seed=3)

    assert torch.equal(cached, reference)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_int8_generation_matches_the_reference_on_the_int8_model(options, monkeypatch):
    # one int8 kernel for every product, as in test_quantize.py: the fused kernel and the bf16 product round apart
    monkeypatch.setattr(quantize, "_FUSED_MAX_ROWS", 10**9)
    model = quantize_int8(model_with(options))
    params = SamplingParams(1.0, None, None)

    assert torch.equal(
        generate(model, [4], 30, 2, params, seed=5), generate_reference(model, [4], 30, 2, params, seed=5)
    )


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_checkpoint_keeps_the_options(options, tmp_path):
    model = model_with(options)
    save_checkpoint(tmp_path / "ckpt.pt", model, CharTokenizer("\n abcdefghi"), step=3, val_loss=1.0)

    loaded, _, _ = load_checkpoint(tmp_path / "ckpt.pt")

    assert loaded.cfg == model.cfg
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_a_checkpoint_from_before_the_options_loads_as_nanogpt(tmp_path):
    model = model_with({})
    save_checkpoint(tmp_path / "ckpt.pt", model, CharTokenizer("\n abcdefghi"), step=3, val_loss=1.0)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for option in NANOGPT_ARCHITECTURE:
        del ckpt["model_config"][option]  # as a checkpoint saved before the options existed
    torch.save(ckpt, tmp_path / "old.pt")

    loaded, _, _ = load_checkpoint(tmp_path / "old.pt")

    assert loaded.cfg == model.cfg


# ---------------------------------------------------------------- the schedule


def wsd(max_iters: int = 1000, warmup: int = 100, cooldown: float = 0.2, min_lr: float = 0.1) -> TrainConfig:
    train = tiny_config().train
    return dataclasses.replace(
        train, schedule="wsd", max_iters=max_iters, warmup_iters=warmup, cooldown=cooldown, min_lr=min_lr
    )


def test_wsd_warms_up_like_cosine():
    cfg = wsd()

    assert [lr_factor(s, cfg) for s in range(100)] == [
        lr_factor(s, dataclasses.replace(cfg, schedule="cosine")) for s in range(100)
    ]


def test_wsd_holds_the_peak_until_the_cooldown():
    cfg = wsd(max_iters=1000, cooldown=0.2)

    assert {lr_factor(s, cfg) for s in range(100, 801)} == {1.0}


def test_wsd_decays_linearly_to_min_lr_over_the_cooldown():
    cfg = wsd(max_iters=1000, cooldown=0.2, min_lr=0.1)

    assert lr_factor(900, cfg) == pytest.approx((1 + 0.1) / 2)
    assert lr_factor(850, cfg) == pytest.approx(1 - 0.25 * 0.9)
    factors = [lr_factor(s, cfg) for s in range(800, 1001)]
    assert all(b < a for a, b in itertools.pairwise(factors))
    assert factors[-1] == pytest.approx(0.1)


# ---------------------------------------------------------------- the moving average of the weights


def test_weight_average_update_arithmetic():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    average = WeightAverage([p], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))

    average.update()

    torch.testing.assert_close(average.average[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]))


def test_weight_average_is_applied_and_the_weights_put_back():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    average = WeightAverage([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    average.update()
    storage = p.data_ptr()

    with average.applied():
        assert p.tolist() == [2.0, 3.0]
    assert p.tolist() == [3.0, 4.0]
    assert p.data_ptr() == storage  # in place: a captured CUDA graph keeps reading the same memory


def test_a_train_step_updates_the_average_after_every_update():
    torch.manual_seed(0)
    model = GPT(BASE, VOCAB)
    params = list(model.parameters())
    average = WeightAverage(params, decay=0.8)
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(model, model, [optimizer], scaler, contextlib.nullcontext(), 1.0, average=average)
    expected = [p.detach().clone() for p in params]

    for i in range(3):
        x = tokens(2, 16, seed=i)
        step([(x, x.roll(-1, 1))])
        expected = [0.8 * e + 0.2 * p.detach() for e, p in zip(expected, params, strict=True)]

    for got, want in zip(average.average, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert tiny_config().train.ema == 0.0  # off unless asked for


def test_ema_decay_must_be_below_one():
    raw = dataclasses.asdict(tiny_config())
    raw["train"]["ema"] = 1.0
    with pytest.raises(UserError, match=r"train\.ema must be less than 1, got 1\.0"):
        config_from_dict(raw)


def test_rope_needs_an_even_head_size():
    raw = dataclasses.asdict(tiny_config())
    raw["model"].update(rope=True, n_embd=6, n_head=2)
    with pytest.raises(UserError, match=r"model\.rope needs an even head size, model.n_embd / model.n_head is 3"):
        config_from_dict(raw)


def test_copy_of_a_model_with_options_is_independent():
    model = model_with(OPTIONS["all"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.wte.weight.add_(1)

    assert not torch.equal(model.wte.weight, twin.wte.weight)
    assert math.isfinite(float(model(tokens(1, 8))[0].sum()))
