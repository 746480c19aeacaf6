"""Stage 2: split data/input.txt 90/10, fit the tokenizer on the training split, write token ids and vocabulary."""

from pathlib import Path

import torch

from nanogpt import files, stage
from nanogpt.data import read_corpus
from nanogpt.errors import UserError, exit_on_user_error, run_and_exit
from nanogpt.tokenizer import fit_tokenizer, save_tokenizer, split_text

DATA = Path("data")


@exit_on_user_error
def main() -> None:
    cfg = stage.config(stage.parser(__doc__).parse_args()).encode
    train_text, val_text = split_text(read_corpus(DATA / "input.txt"), cfg.val_fraction)
    if cfg.tokenizer == "char" and (unseen := "".join(sorted(set(val_text) - set(train_text)))):
        raise UserError(
            f"{DATA / 'input.txt'}: the validation split (the last {cfg.val_fraction:.0%}) has characters "
            f"the training split lacks, which the char vocabulary cannot encode: {unseen!r}"
        )
    tokenizer = fit_tokenizer(cfg.tokenizer, train_text, cfg.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.int32)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.int32)
    files.torch_save(train_ids, DATA / "train.pt")
    files.torch_save(val_ids, DATA / "val.pt")
    save_tokenizer(tokenizer, DATA / "vocab.json")
    print(
        f"{cfg.tokenizer} tokenizer: vocabulary of {tokenizer.vocab_size} tokens; "
        f"train {len(train_ids):,} tokens ({len(train_text):,} chars), "
        f"val {len(val_ids):,} tokens ({len(val_text):,} chars)"
    )


if __name__ == "__main__":
    run_and_exit(main)
