"""What every stage entrypoint shares: the --params flag and the one-line error handling."""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from nanogpt.config import Config, load_config
from nanogpt.errors import UserError

T = TypeVar("T")

OFF = ("none", "null")  # what a flag takes to turn off an optional param (params.yaml writes null)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad flag is one line, like every other bad input (argparse would print its usage first)."""
        raise UserError(f"{message} (see {self.prog} --help)")


def parser(description: str) -> argparse.ArgumentParser:
    """A stage's parser; --help shows `description` (the stage's docstring) as written, example lines included."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: params.yaml)")
    return p


def optional(kind: Callable[[str], T]) -> Callable[[str], T | None]:
    """An argparse type for a flag that stands for an optional param: `none` or `null` is None, the param's off, so
    the flag can turn off what params.yaml turns on; anything else is converted by `kind`."""

    def convert(text: str) -> T | None:
        if text.lower() in OFF:
            return None
        try:
            return kind(text)
        except ValueError:
            name = getattr(kind, "__name__", "")
            raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r} (none turns it off)") from None

    return convert


def config(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    return load_config(args.params, overrides)
