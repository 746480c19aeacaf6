"""Stage 3: train the GPT on data/*.pt; best-val checkpoint to out/ckpt.pt, metrics to metrics/.

Single process: `python stages/train.py`. Several GPUs: `torchrun --nproc_per_node=N stages/train.py`.
"""

import sys
from pathlib import Path

from nanogpt import stage
from nanogpt.errors import exit_on_user_error
from nanogpt.train import Interrupted, train


@exit_on_user_error
def main() -> None:
    cfg = stage.config(stage.parser(__doc__).parse_args())
    try:
        summary = train(cfg)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    print("  ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
