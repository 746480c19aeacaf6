"""Stage 2: split the text (the last encode.val_fraction validates), fit the tokenizer on the training split, and
write the token ids of both splits and the vocabulary."""

from nanogpt import cli
from nanogpt.encode import EncodePaths, encode
from nanogpt.errors import exit_on_user_error, run_and_exit


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    cli.path(p, "--input", "data/input.txt", "the text to encode")
    cli.path(p, "--train", "data/train.pt", "the training split's token ids")
    cli.path(p, "--val", "data/val.pt", "the validation split's token ids")
    cli.path(p, "--vocab", "data/vocab.json", "the vocabulary")
    args = p.parse_args()
    print(encode(cli.config(args).encode, EncodePaths(args.input, args.train, args.val, args.vocab)))


if __name__ == "__main__":
    run_and_exit(main)
