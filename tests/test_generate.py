"""The KV-cached generator (nanogpt/generate.py) against the full-context reference, on the CPU and every GPU."""

import copy
import dataclasses

import pytest
import torch

from conftest import cuda_devices, tiny_config
from nanogpt.generate import Engine, generate, new_kv_cache
from nanogpt.kernels import FusedDecodeCache
from nanogpt.model import GPT
from nanogpt.sampling import SamplingParams, context_length, generate_reference

VOCAB = 13
GREEDY = SamplingParams(temperature=0.0, top_k=None, top_p=None)
PLAIN = SamplingParams(temperature=1.0, top_k=None, top_p=None)
TOP_K = SamplingParams(temperature=0.8, top_k=4, top_p=None)
TOP_P = SamplingParams(temperature=1.2, top_k=None, top_p=0.7)
# the generator's CUDA path (decode steps replayed as CUDA graphs) is checked on every GPU present: on one
# that is not the current device too
DEVICES = ["cpu", *cuda_devices()]  # the CUDA ones marked gpu


def peaked_model(block_size: int = 16, n_embd: int = 32, rope: bool = False) -> GPT:
    """A small random model whose next-token distributions are far from uniform (GPT-2's init gives near-ties)."""
    torch.manual_seed(0)
    cfg = tiny_config(
        {
            "model.block_size": block_size,
            "model.n_layer": 2,
            "model.n_head": 2,
            "model.n_embd": n_embd,
            "model.dropout": 0.0,
            "model.rope": rope,
        }
    ).model
    model = GPT(cfg, VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return peaked_model()


def test_temperature_zero_generates_the_most_likely_token_every_step(model):
    seq = [2, 7, 1]
    for _ in range(30):
        context = seq[-context_length(len(seq), model.cfg.block_size) :]
        logits, _ = model(torch.tensor([context]))
        seq.append(int(logits[0, -1].argmax()))

    tokens = generate(model, [2, 7, 1], 30, 1, GREEDY, seed=123)

    assert tokens[0].tolist() == seq[3:]


@pytest.mark.parametrize("temperature", [1e-6, 1e-40])  # 1 / 1e-40 overflows float32
@pytest.mark.parametrize("params", [PLAIN, TOP_K], ids=["plain", "top_k"])
def test_a_tiny_positive_temperature_generates_as_greedy_does(model, params, temperature):
    params = dataclasses.replace(params, temperature=temperature)

    assert torch.equal(generate(model, [1, 2], 20, 2, params, seed=0), generate(model, [1, 2], 20, 2, GREEDY, seed=0))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_the_model_probabilities(model, temperature):
    n = 3000
    params = SamplingParams(temperature, None, None)
    probs = torch.softmax(model(torch.tensor([[5, 6]]))[0][0, -1] / temperature, dim=-1)

    first = generate(model, [5, 6], 1, n, params, seed=0)[:, 0]

    frequencies = torch.bincount(first, minlength=VOCAB) / n
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.03)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [GREEDY, TOP_K, TOP_P], ids=["greedy", "top_k", "top_p"])
@pytest.mark.parametrize("prompt_len", [1, 5, 23])  # shorter and longer than block_size 16
def test_cached_generation_matches_the_reference(model, device, params, prompt_len):
    model = copy.deepcopy(model).to(device)
    prompt = torch.randint(VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()

    cached = generate(model, prompt, 60, 1, params, seed=3)
    reference = generate_reference(model, prompt, 60, 1, params, seed=3)

    assert cached.shape == (1, 60)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [GREEDY, PLAIN], ids=["greedy", "plain"])
def test_batched_generation_matches_the_reference(model, device, params):
    model = copy.deepcopy(model).to(device)
    cached = generate(model, [1, 2, 3], 40, 3, params, seed=5)
    reference = generate_reference(model, [1, 2, 3], 40, 3, params, seed=5)

    assert torch.equal(cached, reference)


@pytest.mark.parametrize("params", [PLAIN, TOP_P], ids=["plain", "top_p"])
def test_each_row_of_a_batch_is_the_single_run_with_seed_plus_row(model, params):
    batch = generate(model, [4, 5], 30, 3, params, seed=11)

    for row in range(3):
        single = generate(model, [4, 5], 30, 1, params, seed=11 + row)
        assert torch.equal(batch[row], single[0]), row
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("num_tokens", [0, 1, 2])
def test_a_few_tokens_match_the_reference(model, num_tokens):
    cached = generate(model, [3, 1], num_tokens, 2, PLAIN, seed=0)

    assert cached.shape == (2, num_tokens)
    assert torch.equal(cached, generate_reference(model, [3, 1], num_tokens, 2, PLAIN, seed=0))


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    first = generate(model, [0], 40, 1, PLAIN, seed=1)

    assert torch.equal(generate(model, [0], 40, 1, PLAIN, seed=1), first)
    assert not torch.equal(generate(model, [0], 40, 1, PLAIN, seed=2), first)


def test_generation_streams_every_new_token_once_in_order(model):
    pieces = []

    tokens = generate(model, [1], 40, 2, TOP_K, seed=0, on_tokens=pieces.append)  # past block_size 16

    assert len(pieces) > 1
    assert torch.equal(torch.cat(pieces, dim=1), tokens)


def test_generation_leaves_the_model_as_it_was(model):
    x = torch.tensor([[1, 2, 3]])
    before, _ = model(x)

    generate(model, [1, 2, 3], 10, 2, PLAIN, seed=0)

    assert torch.equal(model(x)[0], before)


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [], 5, 1, PLAIN, seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_later_generation_reads_the_weights_as_they_are_then(model, device):
    """On CUDA an engine's first generation captures its graphs and its later ones replay them."""
    model = copy.deepcopy(model).to(device)
    engine = Engine(model, batch_size=1, params=PLAIN)
    first = engine.generate([1, 2], 30, seed=0)

    assert torch.equal(engine.generate([1, 2], 30, seed=0), first)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # in place: the graphs see the new values
    assert torch.equal(engine.generate([1, 2], 30, seed=0), generate_reference(model, [1, 2], 30, 1, PLAIN, seed=0))
    model = model.to(torch.float64)  # new tensors at new addresses: the engine starts afresh
    assert torch.equal(engine.generate([1, 2], 30, seed=0), generate_reference(model, [1, 2], 30, 1, PLAIN, seed=0))


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
@pytest.mark.parametrize("params", [GREEDY, PLAIN, TOP_K], ids=["greedy", "plain", "top_k"])
def test_cuda_graph_generation_of_full_runs_matches_the_reference(params, rope):
    """Context 128, where block_size 16 above stops short: decode runs of the full 32 steps (each one replayed
    CUDA graph), cache positions past the kernel's first block of 64 keys, and slides; fp32, two samples; learned
    positions, and rotary ones, which the kernel applies. With seed 0 the closest call along these tokens is 3e-3
    apart in logits (measured on the CPU, learned positions), over a hundred times what fp32 rounding moves them
    between the cached and the full forward, so equal tokens are not luck."""
    model = peaked_model(block_size=128, n_embd=64, rope=rope).to("cuda")
    assert isinstance(new_kv_cache(model, 2), FusedDecodeCache)  # the Triton kernel, not SDPA

    cached = generate(model, [1, 2, 3, 4, 5], 300, 2, params, seed=0)

    assert torch.equal(cached, generate_reference(model, [1, 2, 3, 4, 5], 300, 2, params, seed=0))


@pytest.mark.gpu
def test_bf16_cuda_graph_generation_is_repeatable():
    """In bf16 the cached tokens need not be the reference's (the kernel and SDPA round differently), but a
    seed gives the same tokens every time: from an engine's replayed graphs, and from graphs captured anew."""
    model = peaked_model(block_size=128, n_embd=64).to("cuda", torch.bfloat16)
    assert isinstance(new_kv_cache(model, 2), FusedDecodeCache)
    engine = Engine(model, batch_size=2, params=PLAIN)

    first = engine.generate([1, 2, 3], 200, seed=4)

    assert torch.equal(engine.generate([1, 2, 3], 200, seed=4), first)
    assert torch.equal(generate(copy.deepcopy(model), [1, 2, 3], 200, 2, PLAIN, seed=4), first)
    assert not torch.equal(generate(model, [1, 2, 3], 200, 2, PLAIN, seed=5), first)


@pytest.mark.slow
@pytest.mark.parametrize("params", [GREEDY, TOP_P], ids=["greedy", "top_p"])
def test_compiled_generation_matches_the_reference(model, params):
    """generate(..., compile=True) fuses the decode step with torch.compile (the CPU's C++ backend here): the
    same tokens as the reference, past block_size."""
    cached = generate(model, [1, 2, 3], 40, 2, params, seed=7, compile=True)

    assert torch.equal(cached, generate_reference(model, [1, 2, 3], 40, 2, params, seed=7))
