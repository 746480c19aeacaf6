"""Stage 2: split data/input.txt 90/10, fit the tokenizer on the training split, write token ids and vocabulary."""

from pathlib import Path

import torch

from nanogpt import files, stage
from nanogpt.data import read_corpus, save_tokens
from nanogpt.errors import UserError, exit_on_user_error, run_and_exit
from nanogpt.tokenizer import fit_tokenizer, save_tokenizer, split_text

DATA = Path("data")
TRAIN, VAL, VOCAB = DATA / "train.pt", DATA / "val.pt", DATA / "vocab.json"


@exit_on_user_error
def main() -> None:
    cfg = stage.config(stage.parser(__doc__).parse_args()).encode
    for path in (TRAIN, VAL, VOCAB):
        files.check_writable(path, "encoded data")
    train_text, val_text = split_text(read_corpus(DATA / "input.txt"), cfg.val_fraction)
    if cfg.tokenizer == "char" and (unseen := "".join(sorted(set(val_text) - set(train_text)))):
        raise UserError(
            f"{DATA / 'input.txt'}: the validation split (the last {cfg.val_fraction:.0%}) has characters "
            f"the training split lacks, which the char vocabulary cannot encode: {unseen!r}"
        )
    tokenizer = fit_tokenizer(cfg.tokenizer, train_text, cfg.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.int32)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.int32)
    save_tokens(TRAIN, train_ids, tokenizer)
    save_tokens(VAL, val_ids, tokenizer)
    save_tokenizer(tokenizer, VOCAB)
    print(
        f"{cfg.tokenizer} tokenizer: vocabulary of {tokenizer.vocab_size} tokens; "
        f"train {len(train_ids):,} tokens ({len(train_text):,} chars), "
        f"val {len(val_ids):,} tokens ({len(val_text):,} chars)"
    )


if __name__ == "__main__":
    run_and_exit(main)
