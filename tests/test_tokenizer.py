"""Character and byte-level BPE tokenizers: lossless round trips, saved and restored as JSON."""

import json

import pytest

from nanogpt.errors import UserError
from nanogpt.tokenizer import (
    BpeTokenizer,
    CharTokenizer,
    fit_tokenizer,
    load_tokenizer,
    save_tokenizer,
    split_text,
    tokenizer_from_dict,
)

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20

UNICODE = "naïve café 😀🎉 日本語のテキスト e\u0301 a\u0308\n\ttabs  and   spaces\r\nend 🏳️‍🌈"


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return BpeTokenizer.fit(TEXT, vocab_size=300)


def test_char_round_trip():
    tok = CharTokenizer.fit(TEXT)

    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_char_vocabulary_is_the_sorted_distinct_characters():
    tok = CharTokenizer.fit("hello world\n")

    assert tok.chars == "\n dehlorw"
    assert tok.vocab_size == 9
    assert tok.encode("\n") == [0]
    assert tok.encode("w") == [8]


def test_char_encode_names_the_unknown_characters():
    tok = CharTokenizer.fit("abc")

    with pytest.raises(UserError) as info:
        tok.encode("abXcZ")

    assert "'XZ'" in str(info.value)


def test_split_keeps_the_first_90_percent_for_training():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))

    train, val = split_text(text, 0.1)

    assert len(train) == 900 and len(val) == 100
    assert train + val == text


@pytest.mark.parametrize("length", [10, 37, 1001, 12345])
def test_split_covers_the_text_exactly(length):
    text = "x" * length

    train, val = split_text(text, 0.1)

    assert len(train) + len(val) == length
    assert len(val) == length - int(length * 0.9)


@pytest.mark.parametrize("text", [TEXT[:200], UNICODE, "", " ", "\n\n\n", "🙂", "  leading and trailing  "])
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_encodes_text_never_seen_in_training(bpe):
    ids = bpe.encode(UNICODE)

    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == UNICODE


def test_bpe_honours_the_vocabulary_size(bpe):
    assert bpe.vocab_size == 300
    assert BpeTokenizer.fit(TEXT, vocab_size=280).vocab_size == 280


def test_bpe_compresses_the_training_text(bpe):
    assert len(bpe.encode(TEXT)) < len(TEXT.encode("utf-8")) / 2


def test_bpe_learns_line_ends_as_the_text_writes_them():
    """Each training line keeps its line end, so a text with Windows line ends (CRLF) learns "\r\n" as one token."""
    tok = BpeTokenizer.fit(TEXT.replace("\n", "\r\n"), vocab_size=300)

    assert len(tok.encode("\r\n")) == 1


def test_bpe_fit_prints_nothing(capfd):
    """No progress bar: the trainer would print one (blank lines where stderr is not a terminal) into the encode
    stage's output."""
    BpeTokenizer.fit(TEXT, vocab_size=280)

    assert capfd.readouterr() == ("", "")


def test_bpe_trained_on_the_training_split_never_sees_validation_text():
    train_only = "the cat sat on the mat. " * 200
    val_only = "zyzzyva quokka " * 200  # frequent enough to be merged if the trainer saw it
    train, val = split_text(train_only + val_only, len(val_only) / len(train_only + val_only))
    assert val == val_only

    tok = fit_tokenizer("bpe", train, 300)

    assert len(tok.encode(" the")) == 1  # learnt from training text
    assert len(tok.encode(" zyzzyva")) > 3  # never merged: byte-level pieces only
    assert len(tok.encode(" quokka")) > 3


def test_fit_tokenizer_picks_the_kind():
    assert fit_tokenizer("char", "abc", 512).kind == "char"
    assert fit_tokenizer("bpe", TEXT, 300).kind == "bpe"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_to_dict_from_dict_round_trip(kind):
    tok = fit_tokenizer(kind, TEXT, 300)
    sample = "Speak, speak.\nYou are all resolved?"

    restored = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))

    assert restored.kind == kind
    assert restored.vocab_size == tok.vocab_size
    assert restored.encode(sample) == tok.encode(sample)
    assert restored.decode(tok.encode(sample)) == sample
    assert restored.to_dict() == tok.to_dict()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_round_trip(tmp_path, kind):
    tok = fit_tokenizer(kind, TEXT, 300)
    path = tmp_path / "vocab.json"

    save_tokenizer(tok, path)
    restored = load_tokenizer(path)

    assert restored.encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize(
    "definition",
    [
        {"kind": "words"},
        ["a", "b"],
        {"kind": "char", "chars": 5},
        {"kind": "char", "chars": ""},
        {"kind": "char", "chars": "abca"},
        {"kind": "bpe", "tokenizer": {"merges": 3}},
    ],
    ids=["unknown kind", "a list", "chars a number", "no chars", "a repeated char", "garbage BPE"],
)
def test_malformed_definition_is_a_value_error(definition):
    with pytest.raises(ValueError):
        tokenizer_from_dict(definition)


def test_missing_vocabulary_file_is_a_user_error(tmp_path):
    path = tmp_path / "vocab.json"

    with pytest.raises(UserError, match="not found"):
        load_tokenizer(path)


def test_corrupt_vocabulary_file_is_a_user_error(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"kind": "char"', encoding="utf-8")

    with pytest.raises(UserError) as info:
        load_tokenizer(path)

    assert str(path) in str(info.value)
