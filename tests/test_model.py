"""The GPT: shapes, causality, tied weights, size, gradient checkpointing and the KV cache."""

import dataclasses

import pytest
import torch

from conftest import cuda_devices, tiny_config
from nanogpt.config import ModelConfig
from nanogpt.generate import new_kv_cache
from nanogpt.model import GPT

TINY = tiny_config(
    {"model.block_size": 16, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.dropout": 0.0}
).model
VOCAB = 11


def tiny_model(cfg: ModelConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, VOCAB).eval()


# on a GPU with Triton a cached decode step goes through the fused kernel (nanogpt/kernels.py); on the CPU through SDPA
DEVICES = ["cpu", *cuda_devices()]  # the CUDA ones marked gpu


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_have_one_row_per_position_and_token():
    model = tiny_model()

    logits, loss = model(tokens(3, 7))

    assert logits.shape == (3, 7, VOCAB)
    assert loss is None


def test_loss_is_a_scalar_near_log_vocab_at_init():
    model = tiny_model()
    x = tokens(4, 16)

    _, loss = model(x, tokens(4, 16, seed=2))

    assert loss.shape == ()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(VOCAB)).item(), abs=0.3)


def test_sequence_longer_than_block_size_is_rejected():
    model = tiny_model()

    with pytest.raises(ValueError, match="block_size 16"):
        model(tokens(1, 17))


@pytest.mark.parametrize("t", [0, 5, 15])
def test_changing_a_token_changes_no_earlier_logit(t):
    model = tiny_model()
    x = tokens(2, 16)
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1) % VOCAB

    before, _ = model(x)
    after, _ = model(changed)

    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_lm_head_is_tied_to_the_token_embedding():
    model = tiny_model()

    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_default_model_has_about_10_7_million_parameters():
    cfg = tiny_config(
        {"model.block_size": 256, "model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.dropout": 0.2}
    ).model

    n = GPT(cfg, 65).num_params()

    assert 10_600_000 < n < 10_800_000


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dropout):
    plain = tiny_model(dataclasses.replace(TINY, dropout=dropout)).train()
    ckpt = tiny_model(dataclasses.replace(TINY, dropout=dropout, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, y = tokens(4, 16), tokens(4, 16, seed=2)

    torch.manual_seed(7)
    _, loss_plain = plain(x, y)
    loss_plain.backward()
    torch.manual_seed(7)
    _, loss_ckpt = ckpt(x, y)
    loss_ckpt.backward()

    assert ckpt.cfg.gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_kv_cache_decode_matches_a_full_forward(device):
    model = tiny_model().to(device)
    x = tokens(3, 16).to(device)
    prefill = 5
    full, _ = model(x)

    cache = new_kv_cache(model, batch_size=3)  # on a GPU the fused kernel's
    logits, _ = model(x[:, :prefill], input_pos=torch.arange(prefill, device=device), kv_cache=cache)
    steps = [logits[:, -1]]
    for pos in range(prefill, 16):
        logits, _ = model(x[:, pos : pos + 1], input_pos=torch.tensor([pos], device=device), kv_cache=cache)
        steps.append(logits[:, -1])

    for pos, step in zip(range(prefill - 1, 16), steps, strict=True):
        torch.testing.assert_close(step, full[:, pos], rtol=0, atol=1e-5)


def test_kv_cache_prefill_overwrites_stale_entries():
    # after a re-prefill of a shorter window, entries past it from the earlier pass must not be seen
    model = tiny_model()
    first, second = tokens(1, 16, seed=3), tokens(1, 8, seed=4)
    expected, _ = model(second)

    cache = new_kv_cache(model, batch_size=1)
    model(first, input_pos=torch.arange(16), kv_cache=cache)
    logits, _ = model(second, input_pos=torch.arange(8), kv_cache=cache)

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_a_forward_with_a_cache_leaves_the_plain_forward_as_it_was():
    model = tiny_model()
    x = tokens(2, 10)
    expected, _ = model(x)

    model(x, input_pos=torch.arange(10), kv_cache=new_kv_cache(model, batch_size=2))
    logits, _ = model(x)

    assert torch.equal(logits, expected)
