"""Int8 weight-only quantisation for CPU sampling: close to the fp32 layers and model it replaces."""

import pytest
import torch
from torch import nn

from conftest import tiny_config
from nanogpt import quantize
from nanogpt.errors import UserError
from nanogpt.generate import generate
from nanogpt.model import GPT
from nanogpt.quantize import Int8Linear, Int8MLP, quantize_int8, uses_int8
from nanogpt.sampling import SamplingParams, context_length, generate_reference, logits_to_probs

VOCAB = 17


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    cfg = tiny_config(
        {"model.block_size": 16, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.dropout": 0.0}
    ).model
    return GPT(cfg, VOCAB).eval()


@pytest.mark.parametrize("rows", [1, 3, 40])  # the fused int8 kernel (decoding) and the bf16 product (prefill)
def test_int8_linear_is_within_a_percent_of_the_linear(rows):
    torch.manual_seed(1)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(2, rows, 64)

    quantized = Int8Linear(linear)

    assert quantized.weight.dtype == torch.int8
    assert quantized(x).dtype == x.dtype
    expected = linear(x)
    error = (quantized(x) - expected).norm() / expected.norm()
    assert error < 0.01


def test_int8_linear_scales_each_output_row_by_its_largest_weight():
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.01, 0.03, -0.04, 0.025]]))

    quantized = Int8Linear(linear)

    assert quantized.weight[0].tolist() == [64, -127, 32, 0]  # round(w / (2 / 127))
    assert quantized.weight[1].tolist() == [32, 95, -127, 79]
    torch.testing.assert_close(quantized.scale.float(), torch.tensor([2.0, 0.04]) / 127, rtol=1e-2, atol=0)


def test_quantized_model_predicts_nearly_the_same_distribution(model):
    x = torch.randint(VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    params = SamplingParams(1.0, None, None)
    with torch.no_grad():
        before = logits_to_probs(model(x)[0].flatten(0, 1), params)
        quantize_int8(model)
        after = logits_to_probs(model(x)[0].flatten(0, 1), params)

    assert all(isinstance(block.mlp, Int8MLP) and isinstance(block.attn.c_attn, Int8Linear) for block in model.blocks)
    total_variation = 0.5 * (before - after).abs().sum(dim=-1)
    assert total_variation.max() < 0.02


def test_quantized_model_generates_past_block_size_with_the_same_seed_the_same_text(model):
    quantize_int8(model)
    params = SamplingParams(0.8, 5, 0.9)

    first = generate(model, [1, 2, 3], 40, 2, params, seed=4)

    assert first.shape == (2, 40) and int(first.min()) >= 0 and int(first.max()) < VOCAB
    assert torch.equal(generate(model, [1, 2, 3], 40, 2, params, seed=4), first)


@pytest.mark.parametrize("fused_max_rows", [0, 1_000_000], ids=["bf16_product", "fused_int8"])
@pytest.mark.parametrize(
    "params", [SamplingParams(0.0, None, None), SamplingParams(1.0, None, None), SamplingParams(0.8, 5, 0.9)]
)
def test_quantized_model_generates_the_reference_tokens(model, params, fused_max_rows, monkeypatch):
    """The KV-cached generator on the int8 model against the full-context reference on the same int8 model,
    past block_size: the cache and its slides read the quantized weights as the reference does.

    One int8 kernel for every product: by default decoding (few rows) takes the fused kernel and the
    reference's full contexts the bf16 product, whose roundings differ by design (a near-tie of 0.008 in
    the logits flips a greedy token within 10 tokens here).
    """
    monkeypatch.setattr(quantize, "_FUSED_MAX_ROWS", fused_max_rows)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # far-from-uniform distributions, as in test_generate.py
    quantize_int8(model)

    cached = generate(model, [1, 2, 3], 40, 2, params, seed=4)

    assert torch.equal(cached, generate_reference(model, [1, 2, 3], 40, 2, params, seed=4))


def test_quantized_cached_greedy_tokens_are_the_full_context_argmax_up_to_rounding(model):
    """With the default kernels (fused int8 for decode steps, the bf16 product for full contexts) each token the
    cached generator picks greedily is the reference's argmax after the same tokens, or within rounding of it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    quantize_int8(model)
    prompt = [1, 2, 3]

    cached = generate(model, prompt, 40, 2, SamplingParams(0.0, None, None), seed=0)

    seq = torch.cat([torch.tensor([prompt] * 2), cached], dim=1)
    with torch.no_grad():
        for n in range(len(prompt), seq.size(1)):
            context = context_length(n, model.cfg.block_size)
            logits = model(seq[:, n - context : n])[0][:, -1]
            chosen = logits.gather(1, seq[:, n, None])[:, 0]
            # the two kernels' roundings differ by about 0.01 in the logits; a wrong token is ~1 or more below
            assert (logits.max(dim=-1).values - chosen).max() < 0.05, n


CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object, not the card: no GPU needed


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", CPU, True), ("auto", CUDA, False), ("int8", CPU, True), (None, CPU, False), (None, CUDA, False)],
)
def test_auto_is_int8_on_a_cpu_and_off_on_a_gpu(setting, device, expected):
    assert uses_int8(setting, device) is expected


def test_int8_forced_on_a_gpu_is_an_error_that_names_the_setting_and_the_device():
    with pytest.raises(UserError, match=r"sample.quantize int8 is for sampling on the CPU, and this run is on cuda:0"):
        uses_int8("int8", CUDA)
