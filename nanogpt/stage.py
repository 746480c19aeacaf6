"""What every stage entrypoint shares: the --params flag and the one-line error handling."""

import argparse
from pathlib import Path

from nanogpt.config import Config, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: params.yaml)")
    return p


def config(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    return load_config(args.params, overrides)
