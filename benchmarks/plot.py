"""Plots of benchmark result files: val loss against wall time, or against the optimizer step.

    python -m benchmarks.plot benchmarks/results/<name>.json ... -o benchmarks/val_loss_vs_time.png
    python -m benchmarks.plot --steps benchmarks/results/2026-12-02-h200-quality.json \\
        benchmarks/results/2026-11-25-h100-run1-explore-nanogpt-recipe.json \\
        --label "nanoGPT's recipe, this code" -o docs/val_loss.png   # README's

A file from `benchmarks.train` (a `series` of evaluations) draws one line; with --steps, a file from
`benchmarks.quality` (`runs`, each with its `val_loss` series) draws one line per seed. The cross is nanoGPT's own
run (benchmarks/results/nanogpt-anchors.json).
"""  # fmt: skip
# (fmt: skip keeps the docstring as written: ruff format would dedent the example, which --help shows)

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ANCHORS = Path(__file__).with_name("results") / "nanogpt-anchors.json"


def lines(result: dict[str, Any], x: str, label: str | None) -> list[tuple[str, list[float], list[float]]]:
    """(label, xs, val losses) of each run in a result file; x is "step" or "seconds"."""
    if "series" in result:
        series = result["series"]
        return [
            (f"{label or result['name']} ({result['card']})", [r[x] for r in series], [r["val_loss"] for r in series])
        ]
    if x != "step":
        raise SystemExit("error: a quality result file has no wall times: plot it with --steps")
    return [
        (
            f"defaults, seed {run['seed']} ({result['card']}): best {run['best_val_loss']:.3f}",
            *map(list, zip(*run["val_loss"], strict=True)),
        )
        for run in result["runs"]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/val_loss_vs_time.png"))
    p.add_argument("--steps", action="store_true", help="val loss against the optimizer step, not wall time")
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--label", action="append", default=[], help="a train result's legend, in order (default: its name)")
    args = p.parse_args()
    x = "step" if args.steps else "seconds"
    nanogpt = json.loads(ANCHORS.read_text())["h100"]

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = iter(args.label)
    for path in args.results:
        result = json.loads(path.read_text())
        for label, xs, losses in lines(result, x, next(labels, None) if "series" in result else None):
            ax.plot(xs, losses, marker="." if x == "seconds" else None, label=label)
    at = nanogpt["best_step"] if args.steps else nanogpt["time_to_val_1.47_s"]
    ax.scatter(
        [at],
        [nanogpt["best_val_loss"]],
        color="black",
        marker="x",
        zorder=3,
        label=f"karpathy/nanoGPT ({nanogpt['card']}): best {nanogpt['best_val_loss']}"
        + ("" if args.steps else f", 1.47 reached at {at} s"),
    )
    ax.axhline(args.target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("optimizer step (64 x 256 tokens)" if args.steps else "seconds since the train stage's launch")
    ax.set_ylabel("val loss (nats per character, whole split)")
    ax.set_ylim(1.35, 1.9 if args.steps else 2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Tiny Shakespeare, 6 layers x 384, context 256")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100 if args.steps else 120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
