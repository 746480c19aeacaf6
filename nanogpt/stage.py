"""What every stage entrypoint shares: the --params flag and the one-line error handling."""

import argparse
from pathlib import Path
from typing import NoReturn

from nanogpt.config import Config, load_config
from nanogpt.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad flag is one line, like every other bad input (argparse would print its usage first)."""
        raise UserError(f"{message} (see {self.prog} --help)")


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: params.yaml)")
    return p


def config(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    return load_config(args.params, overrides)
