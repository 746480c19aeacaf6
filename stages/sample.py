"""Stage 4 and interactive tool: generate text from out/ckpt.pt; flags override params.yaml's sample section.

    python stages/sample.py --prompt "ROMEO:" --num_tokens 500 --temperature 0.8 --top_k 40
"""  # fmt: skip
# (fmt: skip keeps the docstring as written: ruff format would dedent the example, which --help shows)

import sys
from pathlib import Path

from nanogpt import stage
from nanogpt.errors import exit_on_user_error, run_and_exit
from nanogpt.sample_stage import SampleRun, run_sampling

FLAGS = {
    "prompt": str,
    "num_tokens": int,
    "num_samples": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "quantize": str,
}


@exit_on_user_error
def main() -> None:
    p = stage.parser(__doc__)
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"))
    p.add_argument("--vocab", type=Path, help="check the checkpoint's vocabulary against this file")
    p.add_argument("--output", type=Path, help="write all samples here (the stage writes out/samples.txt)")
    p.add_argument("--metrics", type=Path, help="write tokens/s here as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    for name, kind in FLAGS.items():
        p.add_argument(f"--{name}", type=kind, help=f"overrides sample.{name}")
    args = p.parse_args()
    overrides = {f"sample.{k}": getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    cfg = stage.config(args, overrides).sample
    run = SampleRun(args.checkpoint, args.vocab, args.output, args.metrics, args.device)
    run_sampling(cfg, run, stream=sys.stdout if args.output is None or sys.stdout.isatty() else None)


if __name__ == "__main__":
    run_and_exit(main)
