"""Plot val loss against wall time (from the stage's launch) for benchmark result files.

    python -m benchmarks.plot benchmarks/results/<name>.json ... -o benchmarks/val_loss_vs_time.png
"""  # fmt: skip
# (fmt: skip keeps the docstring as written: ruff format would dedent the example, which --help shows)

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/val_loss_vs_time.png"))
    p.add_argument("--target", type=float, default=1.47)
    args = p.parse_args()

    fig, ax = plt.subplots(figsize=(8, 5))
    for path in args.results:
        result = json.loads(path.read_text())
        series = result["series"]
        ax.plot(
            [r["seconds"] for r in series],
            [r["val_loss"] for r in series],
            marker=".",
            label=f"{result['name']} ({result['card']})",
        )
    ax.scatter(
        [81.6], [1.4667], color="black", marker="x", zorder=3, label="nanoGPT: best 1.4667, 1.47 reached at 81.6 s"
    )
    ax.axhline(args.target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("seconds since the train stage's launch")
    ax.set_ylabel("val loss (nats per character, whole split)")
    ax.set_ylim(1.35, 2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Tiny Shakespeare, 6 layers x 384, context 256")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
