"""Tokenizers: characters (nanoGPT's) or byte-level BPE (Hugging Face `tokenizers`), saved as plain JSON."""

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from nanogpt import files
from nanogpt.errors import UserError


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per distinct character of the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            raise UserError(
                f"text has characters outside the vocabulary: {''.join(unknown)!r}; "
                "use only characters from the training text"
            )
        return [self._index[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class BpeTokenizer:
    """Byte-level BPE: every string encodes (no unknown characters), decoding is lossless."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> "BpeTokenizer":
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HfTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        # the ByteLevel decoder replaces the bytes of a cut-off final character with U+FFFD
        return self._tok.decode(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())}


def fit_tokenizer(kind: str, text: str, vocab_size: int) -> Tokenizer:
    """Build a tokenizer of `kind` from `text` (the training split only)."""
    if kind == "char":
        return CharTokenizer.fit(text)
    return BpeTokenizer.fit(text, vocab_size)


def tokenizer_from_dict(d: Any) -> Tokenizer:
    """The tokenizer that `to_dict` described; a ValueError that says what is wrong with anything else."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object with a 'kind', got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise ValueError(f"'chars' must be a string of distinct characters, got {chars!r:.40}")
        return CharTokenizer(chars)
    if kind == "bpe":
        from tokenizers import Tokenizer as HfTokenizer

        try:
            return BpeTokenizer(HfTokenizer.from_str(json.dumps(d.get("tokenizer"))))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed definition
            raise ValueError(f"'tokenizer' is not a Hugging Face tokenizer ({exc})") from None
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'char' or 'bpe'")


def fingerprint(tok: Tokenizer) -> str:
    """The SHA-256 of the tokenizer's definition: the encode stage records it with the token ids, so that ids are
    never read with another vocabulary."""
    return hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()


def save_tokenizer(tok: Tokenizer, path: Path | str) -> None:
    files.write_json(path, tok.to_dict())


def load_tokenizer(path: Path | str) -> Tokenizer:
    path = Path(path)
    try:
        return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"vocabulary {path} not found: run `dvc repro encode` first") from None
    except IsADirectoryError:
        raise UserError(f"vocabulary {path} is a directory: give the path of the file (data/vocab.json)") from None
    except ValueError as exc:  # not UTF-8, not JSON, or not a tokenizer
        raise UserError(f"vocabulary {path} is corrupt ({exc}): rerun `dvc repro encode`") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters train, the rest validate (nanoGPT's split)."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]
