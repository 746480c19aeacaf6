"""Stage 1: fetch the text at data.url, verify data.sha256, and write it atomically."""

from nanogpt import cli, files
from nanogpt.download import download
from nanogpt.errors import exit_on_user_error, run_and_exit


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    cli.path(p, "--output", "data/input.txt", "where the text goes")
    args = p.parse_args()
    cfg = cli.config(args)
    files.check_writable(args.output, "the corpus")
    size = download(cfg.data, args.output)
    print(f"wrote {args.output} ({size:,} bytes, sha256 verified)")


if __name__ == "__main__":
    run_and_exit(main)
