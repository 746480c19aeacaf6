"""Sampling (nanogpt/sampling.py): the filters, the temperature, the noise, the context schedule."""

import dataclasses
import itertools
import math

import pytest
import torch

from nanogpt.sampling import Noise, SamplingParams, context_length, logits_to_probs, sample

GREEDY = SamplingParams(temperature=0.0, top_k=None, top_p=None)
PLAIN = SamplingParams(temperature=1.0, top_k=None, top_p=None)
TOP_K = SamplingParams(temperature=0.8, top_k=2, top_p=None)
TOP_P = SamplingParams(temperature=1.2, top_k=None, top_p=0.7)


def log_probs(*probs: float) -> torch.Tensor:
    """One row of logits whose softmax is `probs`."""
    return torch.tensor([[math.log(p) for p in probs]])


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs[0] > 0).flatten().tolist())


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    probs = logits_to_probs(logits, SamplingParams(1.0, top_k=5, top_p=None))

    assert ((probs > 0).sum(dim=-1) == 5).all()
    assert torch.equal(probs.topk(5).indices.sort().values, logits.topk(5).indices.sort().values)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    probs = logits_to_probs(torch.randn(1, 6), SamplingParams(1.0, top_k=100, top_p=None))

    assert (probs > 0).all()


@pytest.mark.parametrize("top_p, expected", [(0.3, {2}), (0.6, {2, 0}), (0.9, {2, 0, 3}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    # probabilities 0.25, 0.05, 0.5, 0.2: most likely first is 2, 0, 3, 1
    logits = log_probs(0.25, 0.05, 0.5, 0.2)

    probs = logits_to_probs(logits, SamplingParams(1.0, top_k=None, top_p=top_p))

    assert kept(probs) == expected
    original = torch.softmax(logits, dim=-1)
    mass = sum(original[0, i] for i in expected)
    for i in expected:  # the survivors keep their relative odds
        assert probs[0, i].item() == pytest.approx(original[0, i].item() / mass.item())


def test_top_p_at_its_exact_boundary_keeps_only_the_tokens_needed_to_reach_it():
    # the first token's 0.5 reaches top_p 0.5 exactly: the second is not needed (0.5 and 0.25 are exact in
    # float32, so this checks the comparison, `>=`, not rounding)
    probs = logits_to_probs(log_probs(0.5, 0.25, 0.25), SamplingParams(1.0, top_k=None, top_p=0.5))

    assert kept(probs) == {0}


def test_top_p_of_one_keeps_everything():
    probs = logits_to_probs(log_probs(0.7, 0.2, 0.1), SamplingParams(1.0, top_k=None, top_p=1.0))

    assert kept(probs) == {0, 1, 2}


def test_top_p_of_one_keeps_a_token_whose_probability_is_lost_in_rounding():
    """Top-p 1 is off: a token e^-30 times less likely than the other still counts, although float32 rounds the
    mass before it (1 - 9e-14) up to 1."""
    probs = logits_to_probs(torch.tensor([[0.0, -30.0]]), SamplingParams(1.0, top_k=None, top_p=1.0))

    assert kept(probs) == {0, 1}


def test_top_k_then_top_p():
    logits = log_probs(0.4, 0.3, 0.2, 0.1)

    probs = logits_to_probs(logits, SamplingParams(1.0, top_k=3, top_p=0.5))

    # after top-k the odds are 4/9, 3/9, 2/9: the first two reach 0.5
    assert kept(probs) == {0, 1}


def test_temperature_below_one_sharpens_and_above_one_flattens():
    logits = log_probs(0.6, 0.3, 0.1)

    base = logits_to_probs(logits, PLAIN)[0]
    sharp = logits_to_probs(logits, SamplingParams(0.5, None, None))[0]
    flat = logits_to_probs(logits, SamplingParams(2.0, None, None))[0]

    assert sharp[0] > base[0] > flat[0]
    assert sharp[2] < base[2] < flat[2]
    torch.testing.assert_close(base, torch.tensor([0.6, 0.3, 0.1]))
    # temperature 0.5 squares the odds: 0.36 : 0.09 : 0.01
    torch.testing.assert_close(sharp, torch.tensor([0.36, 0.09, 0.01]) / 0.46)


def test_temperature_zero_puts_all_the_mass_on_the_argmax():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))

    probs = logits_to_probs(logits, GREEDY)

    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
    torch.testing.assert_close(probs.max(dim=-1).values, torch.ones(4))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_are_the_softmax_of_logits_over_temperature(temperature):
    """The default path of `sample` (no top-k, no top-p: logits / T plus Gumbel noise in one kernel) draws
    from softmax(logits / T), computed here without the package's code."""
    n = 200_000
    logits = torch.tensor([1.5, 0.0, -1.0, 0.5, -2.0])
    gumbel = torch.empty(n, 5).exponential_(generator=torch.Generator().manual_seed(0)).log_().neg_()

    tokens = sample(logits.expand(n, 5), SamplingParams(temperature, None, None), gumbel)

    frequencies = torch.bincount(tokens, minlength=5) / n
    expected = torch.softmax(logits / temperature, dim=-1)
    # each frequency's standard deviation is at most sqrt(0.25 / n) = 0.0011: 0.006 is over 5 of them, while
    # a temperature applied the wrong way round (logits * T) moves some probability by more than 0.1
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.006)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0, top_k=3, top_p=None), SamplingParams(1.0, top_k=None, top_p=0.8)],
    ids=["top_k", "top_p"],
)
def test_sampled_frequencies_follow_top_k_or_top_p_alone(params):
    """With only one of top-k and top-p set, `sample` draws from the tokens it keeps (here the three likeliest)
    in their odds 4 : 3 : 2."""
    n = 100_000
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    gumbel = torch.empty(n, 4).exponential_(generator=torch.Generator().manual_seed(0)).log_().neg_()

    tokens = sample(logits.expand(n, 4), params, gumbel)

    frequencies = torch.bincount(tokens, minlength=4) / n
    # standard deviation at most sqrt(0.25 / n) = 0.0016; an unfiltered draw gives the last token 0.1, noise
    # subtracted instead of added moves the others by over 0.02
    torch.testing.assert_close(frequencies, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), rtol=0, atol=0.01)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0, top_k=2, top_p=None), SamplingParams(1.0, top_k=None, top_p=0.5)],
    ids=["top_k", "top_p"],
)
def test_a_token_that_the_filter_drops_is_never_drawn_for_a_single_sample(params):
    """However large its noise: one sample, fewer than top_k, is filtered as a batch is."""
    gumbel = torch.tensor([[0.0, 0.0, 0.0, 50.0]])

    token = sample(log_probs(0.4, 0.3, 0.2, 0.1), params, gumbel)

    assert token.tolist() == [0]


def test_noise_gives_each_token_the_same_numbers_however_they_are_asked_for():
    """Asked for in pieces that cross the blocks the noise is drawn in, as a long generation asks for it, or all
    at once: the same numbers for each token."""
    n = 3 * Noise.CHUNK + 100
    whole = Noise(seed=5, num_samples=2, vocab_size=3, device=torch.device("cpu")).for_tokens(0, n)
    noise = Noise(seed=5, num_samples=2, vocab_size=3, device=torch.device("cpu"))
    starts = [0, 1, 300, 511, 512, 513, 900, 1030, 1536, 1600]

    pieces = [noise.for_tokens(i, j - i) for i, j in itertools.pairwise([*starts, n])]

    assert torch.equal(torch.cat(pieces), whole)


def test_context_length_is_everything_up_to_block_size():
    assert [context_length(n, 8) for n in range(1, 9)] == list(range(1, 9))


@pytest.mark.parametrize("block_size", [1, 2, 7, 8, 16])
def test_context_length_cycles_between_half_and_full_block_after_it(block_size):
    lengths = [context_length(n, block_size) for n in range(block_size + 1, 5 * block_size + 3)]
    keep = max(1, block_size // 2)

    assert lengths[0] == keep  # the full cache restarts from its last half
    assert all(keep <= w <= block_size for w in lengths)
    for prev, nxt in itertools.pairwise(lengths):
        assert nxt == prev + 1 or (prev == block_size and nxt == keep)
    assert block_size in lengths


def test_context_length_example():
    assert [context_length(n, 8) for n in range(8, 20)] == [8, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4]


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 5e-324])  # 1 / 1e-40 overflows float32; 1 / 5e-324, float64
@pytest.mark.parametrize("params", [PLAIN, TOP_K, TOP_P], ids=["plain", "top_k", "top_p"])
def test_any_positive_temperature_samples_the_most_likely_token(params, temperature):
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    gumbel = torch.tensor([[3.0, 0.0, 3.0, 1.0]])  # enough to draw another token at temperature 1

    assert sample(logits, dataclasses.replace(params, temperature=temperature), gumbel).tolist() == [1]
