"""The encode stage's work: split the text, fit the tokenizer on the training split, write both splits' token ids."""

from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt import files
from nanogpt.config import EncodeConfig
from nanogpt.data import read_corpus, save_tokens
from nanogpt.errors import UserError
from nanogpt.tokenizer import fit_tokenizer, save_tokenizer, split_text


@dataclass(frozen=True)
class EncodePaths:
    """The stage's files: the text it reads and the token ids and vocabulary it writes."""

    corpus: Path
    train: Path
    val: Path
    vocab: Path


def encode(cfg: EncodeConfig, paths: EncodePaths) -> str:
    """Split `paths.corpus` (the last `val_fraction` validates), fit `cfg.tokenizer` on the training split, and
    write both splits' ids and the vocabulary; return a one-line summary. Nothing is written if a check fails."""
    for path in (paths.train, paths.val, paths.vocab):
        files.check_writable(path, "encoded data")
    train_text, val_text = split_text(read_corpus(paths.corpus), cfg.val_fraction)
    if cfg.tokenizer == "char" and (unseen := "".join(sorted(set(val_text) - set(train_text)))):
        raise UserError(
            f"{paths.corpus}: the validation split (the last {cfg.val_fraction:g} of the text) has characters "
            f"the training split lacks, which the char vocabulary cannot encode: {unseen!r}; lower "
            "encode.val_fraction (e.g. 0.1) so that the training split holds them, or use encode.tokenizer=bpe"
        )
    tokenizer = fit_tokenizer(cfg.tokenizer, train_text, cfg.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.int32)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.int32)
    save_tokens(paths.train, train_ids, tokenizer)
    save_tokens(paths.val, val_ids, tokenizer)
    save_tokenizer(tokenizer, paths.vocab)
    return (
        f"{cfg.tokenizer} tokenizer: vocabulary of {tokenizer.vocab_size} tokens; "
        f"train {len(train_ids):,} tokens ({len(train_text):,} chars), "
        f"val {len(val_ids):,} tokens ({len(val_text):,} chars)"
    )
