"""The encode stage's work (nanogpt/encode.py): the split, the tokenizer fitted on the training split, the files."""

from pathlib import Path

import pytest

from conftest import make_corpus, tiny_config
from nanogpt.data import load_tokens
from nanogpt.encode import EncodePaths, encode
from nanogpt.errors import UserError
from nanogpt.tokenizer import load_tokenizer


def paths_under(folder: Path, text: bytes) -> EncodePaths:
    (folder / "input.txt").write_bytes(text)
    return EncodePaths(folder / "input.txt", folder / "train.pt", folder / "val.pt", folder / "vocab.json")


@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_the_last_val_fraction_of_the_text_validates(tmp_path: Path, val_fraction: float) -> None:
    text = make_corpus(size=5_000)
    paths = paths_under(tmp_path, text)

    summary = encode(tiny_config({"encode.val_fraction": val_fraction}).encode, paths)

    tokenizer = load_tokenizer(paths.vocab)
    train, val = (load_tokens(path, tokenizer, paths.vocab) for path in (paths.train, paths.val))
    split = int(len(text) * (1 - val_fraction))
    assert tokenizer.decode(train.tolist()) == text[:split].decode()
    assert tokenizer.decode(val.tolist()) == text[split:].decode()
    assert f"val {len(val):,} tokens ({len(text) - split:,} chars)" in summary


def test_characters_only_the_validation_split_has_are_named_with_the_fix(tmp_path: Path) -> None:
    paths = paths_under(tmp_path, b"abc abc cab\n" * 20 + b"XYZ")

    with pytest.raises(UserError) as info:
        encode(tiny_config({"encode.val_fraction": 0.1}).encode, paths)

    assert "'XYZ'" in str(info.value)
    assert "lower encode.val_fraction" in str(info.value) and "encode.tokenizer=bpe" in str(info.value)
    assert not any(path.exists() for path in (paths.train, paths.val, paths.vocab))  # nothing half-written
