"""Stage 1: fetch the corpus at data.url, verify data.sha256, write data/input.txt atomically."""

from pathlib import Path

from nanogpt import files, stage
from nanogpt.download import download
from nanogpt.errors import exit_on_user_error, run_and_exit

OUTPUT = Path("data/input.txt")


@exit_on_user_error
def main() -> None:
    cfg = stage.config(stage.parser(__doc__).parse_args())
    files.check_writable(OUTPUT, "the corpus")
    size = download(cfg.data, OUTPUT)
    print(f"wrote {OUTPUT} ({size:,} bytes, sha256 verified)")


if __name__ == "__main__":
    run_and_exit(main)
