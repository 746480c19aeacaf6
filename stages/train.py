"""Stage 3: train the GPT on data/*.pt; best-val checkpoint to out/ckpt.pt, metrics to metrics/.

Single process: `python -m stages.train`. N GPUs: `torchrun --standalone --nproc_per_node=N -m stages.train`.
"""

import os
import sys

from nanogpt import stage
from nanogpt.errors import exit_on_user_error, run_and_exit
from nanogpt.train import Interrupted, train


@exit_on_user_error
def main() -> None:
    cfg = stage.config(stage.parser(__doc__).parse_args())
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, one process speaks for all
    try:
        summary = train(cfg)
    except Interrupted as exc:
        if is_main:
            print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    if is_main:
        print("  ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    run_and_exit(main)
