r"""Stage 4 and interactive tool: generate text from out/ckpt.pt; flags override params.yaml's sample section.

    python stages/sample.py --prompt "ROMEO:" --num_tokens 500 --temperature 0.8 --top_k 40
    python stages/sample.py --checkpoint out/ckpt.pt --prompt "\n" --num_tokens 500 --temperature 1.0 --top_k 40

--prompt understands \n (newline), \t (tab) and \\ (a backslash); --top_k, --top_p and --quantize take none
(or null) to turn off what params.yaml turns on.
"""  # fmt: skip
# (fmt: skip keeps the docstring as written: ruff format would dedent the examples, which --help shows)

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from nanogpt import cli
from nanogpt.errors import exit_on_user_error, run_and_exit
from nanogpt.sample import SampleRun, run_sampling

# one flag per key of params.yaml's sample section, each overriding it when given
FLAGS: dict[str, tuple[Callable[[str], object], str]] = {
    "prompt": (str, r"overrides sample.prompt; \n, \t and \\ stand for a newline, a tab and a backslash"),
    "num_tokens": (int, "overrides sample.num_tokens"),
    "num_samples": (int, "overrides sample.num_samples"),
    "temperature": (float, "overrides sample.temperature; 0 is greedy"),
    "top_k": (cli.optional(int), "overrides sample.top_k; none: off"),
    "top_p": (cli.optional(float), "overrides sample.top_p; none: off"),
    "seed": (int, "overrides sample.seed"),
    "quantize": (cli.optional(str), "overrides sample.quantize: auto (int8 on a CPU, off on a GPU), int8 or none"),
}


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"), help="default: out/ckpt.pt")
    p.add_argument("--vocab", type=Path, help="check the checkpoint's vocabulary against this file")
    p.add_argument("--output", type=Path, help="write all samples here (the stage writes out/samples.txt)")
    p.add_argument("--metrics", type=Path, help="write tokens/s here as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    # SUPPRESS: a flag not given leaves no attribute, so `--top_k none` (None) can still override params.yaml
    for name, (kind, words) in FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=words)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="overrides sample.compile: torch.compile the decode step",
    )
    args = p.parse_args()
    overrides = {f"sample.{k}": v for k, v in vars(args).items() if k in FLAGS or k == "compile"}
    cfg = cli.config(args, overrides).sample
    run = SampleRun(args.checkpoint, args.vocab, args.output, args.metrics, args.device)
    run_sampling(cfg, run, stream=sys.stdout if args.output is None or sys.stdout.isatty() else None)


if __name__ == "__main__":
    run_and_exit(main)
