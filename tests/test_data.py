"""Training batches, the exact validation pass, bits per character and reading the corpus."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from nanogpt.data import (
    IGNORE,
    bits_per_char,
    eval_windows,
    evaluate,
    get_batch,
    load_tokens,
    read_corpus,
    save_tokens,
)
from nanogpt.errors import UserError
from nanogpt.files import torch_save
from nanogpt.model import GPT
from nanogpt.tokenizer import CharTokenizer

TINY = tiny_config(
    {"model.block_size": 8, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.dropout": 0.0}
).model
VOCAB = 7


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n,), generator=generator(seed), dtype=torch.int64).to(torch.uint16)


def test_batch_shapes_and_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(1000)

    x, y = get_batch(tokens, batch_size=5, block_size=16, generator=generator(0))

    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == torch.long
    # with tokens 0..999 every window is a run of consecutive numbers
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(5, 16))
    assert torch.equal(y, x + 1)


def test_batch_windows_stay_inside_the_tokens():
    tokens = torch.arange(10)

    x, y = get_batch(tokens, batch_size=200, block_size=9, generator=generator(0))

    assert torch.equal(x, torch.arange(9).expand(200, 9))  # the only window that fits
    assert y.max().item() == 9


def test_same_seed_gives_the_same_batch():
    tokens = random_tokens(500)

    first = get_batch(tokens, 4, 8, generator(42))
    second = get_batch(tokens, 4, 8, generator(42))
    other = get_batch(tokens, 4, 8, generator(43))

    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("n", [9, 10, 16, 17, 23, 24, 25, 33, 100, 101])
def test_eval_windows_score_every_target_exactly_once(n):
    block = 8
    tokens = torch.arange(n)  # a target's value is its position

    data = eval_windows(tokens, block)

    assert data.x.shape == data.y.shape and data.x.shape[1] == block
    assert data.num_targets == n - 1
    scored = data.y[data.y != IGNORE]
    assert torch.equal(scored.sort().values, torch.arange(1, n))
    # every scored target follows its own input
    rows, cols = torch.nonzero(data.y != IGNORE, as_tuple=True)
    assert torch.equal(data.y[rows, cols], data.x[rows, cols] + 1)


def test_split_too_short_for_the_block_names_block_size():
    with pytest.raises(UserError, match=r"model\.block_size \(8\) needs at least 9 tokens in the split, which has 8"):
        eval_windows(torch.arange(8), 8)


def per_window_reference(model: GPT, tokens: torch.Tensor, block: int) -> float:
    """Mean cross-entropy over every target, each predicted from the window that eval_windows gives it."""
    n = len(tokens)
    total, count = 0.0, 0
    seen = set()
    for start in [*range(0, n - 1 - block + 1, block), n - 1 - block]:
        window = tokens[start : start + block + 1].long()
        logits, _ = model(window[None, :-1])
        losses = F.cross_entropy(logits[0], window[1:], reduction="none")
        for offset, loss in enumerate(losses.tolist()):
            target = start + offset + 1
            if target not in seen:
                seen.add(target)
                total += loss
                count += 1
    assert count == n - 1
    return total / count


@pytest.mark.parametrize("n", [41, 45])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_evaluate_is_the_mean_cross_entropy_over_all_targets(n, batch_size):
    torch.manual_seed(0)
    model = GPT(TINY, VOCAB).eval()
    tokens = random_tokens(n, seed=1)

    total, count = evaluate(model, eval_windows(tokens, 8), batch_size, contextlib.nullcontext())

    assert count.item() == n - 1
    assert total.item() / count.item() == pytest.approx(per_window_reference(model, tokens, 8), abs=1e-5)


def test_evaluate_shares_split_across_ranks_add_up_to_the_whole():
    torch.manual_seed(0)
    model = GPT(TINY, VOCAB)
    data = eval_windows(random_tokens(85, seed=2), 8)
    whole = evaluate(model, data, 2, contextlib.nullcontext())

    shares = [evaluate(model, data, 2, contextlib.nullcontext(), rank=r, world_size=3) for r in range(3)]

    assert sum(c.item() for _, c in shares) == whole[1].item()
    assert sum(t.item() for t, _ in shares) == pytest.approx(whole[0].item(), abs=1e-9)


def test_evaluate_is_deterministic_and_restores_training_mode():
    torch.manual_seed(0)
    model = GPT(TINY, VOCAB).train()
    data = eval_windows(random_tokens(60), 8)

    first = evaluate(model, data, 3, contextlib.nullcontext())
    second = evaluate(model, data, 3, contextlib.nullcontext())

    assert model.training
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_evaluate_max_batches_limits_the_targets():
    torch.manual_seed(0)
    model = GPT(TINY, VOCAB)
    data = eval_windows(torch.zeros(81, dtype=torch.long), 8)  # 10 full windows

    _, count = evaluate(model, data, 2, contextlib.nullcontext(), max_batches=3)

    assert count.item() == 3 * 2 * 8


def test_bits_per_char():
    # ln 2 nats per token, one token per character: one bit per character
    assert bits_per_char(math.log(2), 1.0) == pytest.approx(1.0)
    # 2 nats per token, a token every 4 characters: 0.5 nats = 0.5 / ln 2 bits per character
    assert bits_per_char(2.0, 0.25) == pytest.approx(0.5 / math.log(2))


def test_read_corpus_returns_the_text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("héllo\nwörld\n", encoding="utf-8")

    assert read_corpus(path) == "héllo\nwörld\n"


@pytest.mark.parametrize(
    "content, problem", [(b"", "empty"), (b"caf\xe9 latin-1\n", "UTF-8")], ids=["empty", "not utf-8"]
)
def test_read_corpus_rejects_a_bad_file(tmp_path, content, problem):
    path = tmp_path / "input.txt"
    path.write_bytes(content)

    with pytest.raises(UserError) as info:
        read_corpus(path)

    assert str(path) in str(info.value) and problem in str(info.value)


def test_read_corpus_of_a_missing_file_says_to_download_it(tmp_path):
    path = tmp_path / "input.txt"

    with pytest.raises(UserError) as info:
        read_corpus(path)

    assert str(path) in str(info.value) and "dvc repro download" in str(info.value)


def test_load_tokens_round_trip(tmp_path):
    path, tokenizer = tmp_path / "train.pt", CharTokenizer("abc")
    tokens = random_tokens(50)
    save_tokens(path, tokens, tokenizer)

    assert torch.equal(load_tokens(path, tokenizer, tmp_path / "vocab.json"), tokens)


@pytest.mark.parametrize(
    "content",
    [torch.rand(3, 3), torch.zeros(3, 3, dtype=torch.int64), torch.rand(5), {"ids": torch.arange(5)}],
    ids=["2-D floats", "2-D integers", "1-D floats", "a dict without tokens"],
)
def test_load_tokens_rejects_a_file_of_something_else(tmp_path, content):
    path = tmp_path / "train.pt"
    torch_save(content, path)

    with pytest.raises(UserError, match="1-D tensor of token ids"):
        load_tokens(path, CharTokenizer("abc"), tmp_path / "vocab.json")


def test_load_tokens_rejects_ids_of_another_tokenizer(tmp_path):
    """A vocabulary of the same size but other characters would decode every id to the wrong one, silently."""
    path = tmp_path / "train.pt"
    save_tokens(path, random_tokens(50), CharTokenizer("abc"))

    with pytest.raises(UserError, match=r"encoded with another tokenizer than .*vocab.json.*dvc repro encode"):
        load_tokens(path, CharTokenizer("xyz"), tmp_path / "vocab.json")


def test_load_tokens_rejects_ids_that_do_not_name_their_tokenizer(tmp_path):
    path = tmp_path / "train.pt"
    torch_save(random_tokens(50), path)  # the format before the tokenizer's fingerprint was recorded

    with pytest.raises(UserError, match="does not say which tokenizer made it"):
        load_tokens(path, CharTokenizer("abc"), tmp_path / "vocab.json")


def test_load_tokens_of_a_missing_file_names_it_a_token_file(tmp_path):
    path = tmp_path / "train.pt"

    with pytest.raises(UserError) as info:
        load_tokens(path, CharTokenizer("abc"), tmp_path / "vocab.json")

    assert f"token file {path} not found" in str(info.value)
