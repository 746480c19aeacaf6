"""Stage 3: train the GPT on the encoded data; the best-val checkpoint, metrics and resume state go where the flags say.

Single process: `python -m stages.train`. N GPUs: `torchrun --standalone --nproc_per_node=N -m stages.train`.
"""

import os
import sys

from nanogpt import cli
from nanogpt.errors import exit_on_user_error, run_and_exit
from nanogpt.train import Interrupted, TrainPaths, train


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    cli.path(p, "--data", "data", "the folder of train.pt, val.pt and vocab.json")
    cli.path(p, "--checkpoint", "out/ckpt.pt", "the best-val checkpoint")
    cli.path(p, "--resume", "out/resume", "the resume state, kept until the run finishes")
    cli.path(p, "--metrics", "metrics", "the folder of train.json and the loss series")
    cli.path(p, "--tensorboard", "out/tensorboard", "TensorBoard event files, with train.tensorboard")
    args = p.parse_args()
    cfg = cli.config(args)
    paths = TrainPaths(args.data, args.checkpoint, args.resume, args.metrics, args.tensorboard)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks for all
    try:
        summary = train(cfg, paths)
    except Interrupted as exc:
        if is_main:
            print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    if is_main:
        print("  ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    run_and_exit(main)
