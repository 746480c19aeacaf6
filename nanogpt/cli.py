"""The stages' shared command line: the --params flag, path flags, and bad flags reported as one `error:` line."""

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


def path(p: argparse.ArgumentParser, flag: str, default: str, what: str) -> None:
    """A flag for one of the stage's files (`--output data/input.txt`); dvc.yaml names each in the stage's cmd, so
    the default is only for running the stage by hand."""
    p.add_argument(flag, type=Path, default=Path(default), help=f"{what} (default: {default})")


def config(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    """params.yaml (--params) with `overrides`, validated; a UserError lists every problem."""
    return load_config(args.params, overrides)
