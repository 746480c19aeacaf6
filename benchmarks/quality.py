"""Model-quality sweep: queued `dvc exp run`s in a scratch repository, one row per experiment.

    python -m benchmarks.quality --data /path/to/input.txt --name h200-quality-sweep \\
        --sweep benchmarks/sweeps/options.txt --jobs 4
    python -m benchmarks.quality --summary benchmarks/results/h200-quality-sweep.json   # the table by config

Each line of a --sweep file is the arguments of one `dvc exp run --queue`, DVC's grid syntax included
(`-S train.seed=1,2,3` queues three experiments); `#` starts a comment. The queue runs with
`dvc exp run --run-all -j N`, and every experiment's params and train metrics are read back with
`dvc exp show --json`. Experiments that share one GPU (-j > 1) slow each other down: their train-stage times
are for the sweep, not a solo run (--jobs 1 for those). Works in a scratch git repository, never in this
workspace. Writes benchmarks/results/<name>.json and <name>.md (`dvc exp show --md`, the changed columns).
"""

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.experiments import RESULTS, ROOT, run, scratch_repo

METRICS = ("best_val_loss", "best_val_bpc", "best_step", "wall_time_s", "tokens_per_sec")


def queue(repo: Path, env: dict[str, str], sweep: Path) -> int:
    """Queue every line of the sweep file; returns the number of lines."""
    lines = [line.split("#")[0].strip() for line in sweep.read_text().splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        run(["dvc", "exp", "run", "--queue", *shlex.split(line)], repo, env)
    return len(lines)


def run_all(repo: Path, env: dict[str, str], jobs: int, time_limit: float | None) -> tuple[float, bool]:
    """`dvc exp run --run-all -j jobs`; stopped after `time_limit` seconds (the experiments done by then are kept,
    the rest are reported as not run). Returns the wall time and whether it finished."""
    started = time.perf_counter()
    cmd = ["dvc", "exp", "run", "--run-all", "-j", str(jobs)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True)
    try:
        proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        return time.perf_counter() - started, False
    return time.perf_counter() - started, proc.returncode == 0


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def experiments(repo: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Name, params (flattened: `train.seed`) and train metrics of every experiment of the workspace's commit."""
    _, lines = run(["dvc", "exp", "show", "--json", "--no-pager"], repo, env)
    shown = json.loads("\n".join(line for _, line in lines))
    rows = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
                metrics = (data.get("metrics") or {}).get("metrics/train.json", {}).get("data", {})
                if not metrics:
                    continue  # a failed experiment
                row = {"name": rev.get("name"), "params": params, **{k: metrics.get(k) for k in METRICS}}
                sample = (data.get("metrics") or {}).get("metrics/sample.json", {}).get("data", {})
                row["sample_tokens_per_sec"] = sample.get("tokens_per_sec")
                row["val_loss"] = val_series(repo, env, rev["rev"])
                if row["val_loss"]:  # else not committed: stopped by --time-limit, its train.json from mid-run
                    rows.append(row)
    return rows


def val_series(repo: Path, env: dict[str, str], rev: str) -> list[list[float]]:
    """[step, val_loss] of every evaluation of the experiment at `rev` (its metrics/val_loss.tsv, kept in git)."""
    shown = subprocess.run(
        ["git", "show", f"{rev}:metrics/val_loss.tsv"], cwd=repo, env=env, capture_output=True, check=False
    )
    if shown.returncode:
        return []
    header, *rows = [line.split("\t") for line in shown.stdout.decode().splitlines() if line]
    step, loss = header.index("step"), header.index("val_loss")
    return [[int(row[step]), float(row[loss])] for row in rows]


def changed(rows: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    """Give each row `config`: its params that differ from the defaults, the seed left out (in place)."""
    for row in rows:
        row["config"] = {
            k: v for k, v in row["params"].items() if defaults.get(k) != v and k not in ("train.seed", "data.url")
        }
        row["seed"] = row["params"].get("train.seed")
        del row["params"]


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per config: seeds, mean, spread (min-max) and the best of best_val_loss, mean train-stage time."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["config"], sort_keys=True), []).append(row)
    out = []
    for key, runs in groups.items():
        losses = [r["best_val_loss"] for r in runs]
        out.append(
            {
                "config": json.loads(key),
                "seeds": [r["seed"] for r in runs],
                "mean": round(statistics.fmean(losses), 4),
                "min": min(losses),
                "max": max(losses),
                "train_stage_s": round(statistics.fmean(r["wall_time_s"] for r in runs), 1),
            }
        )
    return sorted(out, key=lambda g: g["mean"])


def expand(line: str) -> list[tuple[dict[str, Any], int | None]]:
    """The experiments one `dvc exp run --queue` line queues, in DVC's grid order: (overrides without the seed,
    seed)."""
    import yaml

    args = shlex.split(line)
    sets = [args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-S"]
    grid = [[(key, yaml.safe_load(v)) for v in value.split(",")] for key, value in sets]
    out = []
    for combo in itertools.product(*grid):
        overrides = dict(combo)
        seed = overrides.pop("train.seed", None)
        out.append((overrides, seed))
    return out


def runs_from_log(log: str, configs: list[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """The runs of a sweep rebuilt from its `dvc exp run --run-all` output, for a sweep whose collection failed:
    each experiment's block (`Reproducing experiment 'name'`), its evaluations (`step N: ... val X`) and the train
    stage's summary line (`best_val_loss=...`). `configs`: (config, seed) of each queued experiment, in queue
    order, which is the order a queue starts them in; an experiment with no summary line did not finish."""
    blocks = re.split(r"^Reproducing experiment '([\w-]+)'$", log, flags=re.MULTILINE)[1:]
    runs = []
    for name, text, (config, seed) in zip(blocks[::2], blocks[1::2], configs, strict=False):
        summary = re.search(r"^best_val_loss=.*$", text, flags=re.MULTILINE)
        if summary is None:
            continue
        values = dict(item.split("=") for item in summary[0].split())
        evals = re.findall(r"^step (\d+): .*\bval ([\d.]+)", text, flags=re.MULTILINE)
        runs.append(
            {
                "name": name,
                "config": config,
                "seed": seed,
                **{k: float(values[k]) if "." in values[k] else int(values[k]) for k in METRICS},
                "val_loss": [[int(step), float(loss)] for step, loss in evals],
            }
        )
    return runs


def markdown(groups: list[dict[str, Any]]) -> str:
    lines = ["| config (changes from the defaults) | seeds | mean best val | min - max | train stage (s) |"]
    lines.append("|---|---|---|---|---|")
    for g in groups:
        config = ", ".join(f"{k}={v}" for k, v in g["config"].items()) or "defaults"
        lines.append(
            f"| {config} | {len(g['seeds'])} | {g['mean']:.4f} | {g['min']:.4f} - {g['max']:.4f} | "
            f"{g['train_stage_s']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], output: Path) -> None:
    """Val loss against step of every run of a quality result file: the chosen config and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = [
        ("before #14 (defaults then)", result["baseline"], "tab:gray"),
        ("after #14 (defaults now)", result, "tab:blue"),
    ]
    for label, group, color in groups:
        for i, r in enumerate(group["runs"]):
            steps, losses = zip(*r["val_loss"], strict=True)
            ax.plot(
                steps,
                losses,
                color=color,
                alpha=0.8,
                label=f"{label}, mean best {group['summary']['mean']:.4f}" if i == 0 else None,
            )
    ax.axhline(1.40, color="tab:red", linestyle=":", linewidth=1, label="1.40")
    ax.set_ylim(1.35, 1.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val loss (nats per character, whole split)")
    ax.set_title(f"Validation loss, three seeds each ({result['card']}, {result['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", type=Path, help="print the by-config table of a result file and stop")
    p.add_argument("--data", type=Path, help="a local copy of the corpus (read through file://)")
    p.add_argument("--name", help="result file name (benchmarks/results/<name>.json); should contain 'quality'")
    p.add_argument("--sweep", type=Path, action="append", help="a file of `dvc exp run --queue` argument lines")
    p.add_argument("--source", type=Path, default=ROOT, help="the code to run (default: this checkout)")
    p.add_argument("--jobs", type=int, default=4, help="experiments run at once")
    p.add_argument("--plot", type=Path, help="plot a quality result file's runs (with -o) and stop")
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/quality_val_loss.png"))
    p.add_argument("--from-log", type=Path, help="rebuild the runs of a sweep from its saved output (with --sweep)")
    p.add_argument("--time-limit", type=float, help="stop the queue after this many seconds, keep what finished")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.summary is not None:
        print(markdown(summary(json.loads(args.summary.read_text())["runs"])))
        return
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.output)
        return
    if args.from_log is not None:
        lines = [line.split("#")[0].strip() for sweep in args.sweep for line in sweep.read_text().splitlines()]
        configs = [experiment for line in lines if line for experiment in expand(line)]
        runs = runs_from_log(args.from_log.read_text(), configs)
        print(json.dumps({"runs": runs, "by_config": summary(runs)}, indent=2))
        return
    if args.data is None or args.name is None or not args.sweep:
        p.error("--data, --name and --sweep are required")

    import torch
    import yaml

    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": shlex.join(["python", "-m", "benchmarks.quality", *sys.argv[1:]]),
        "jobs": args.jobs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        repo = scratch_repo(args.source, Path(tmp) / "repo", "file://" + str(args.data.resolve()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
        run(["dvc", "repro", "encode"], repo, env)  # the data every experiment shares
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "data"], repo, env)
        result["queued_lines"] = sum(queue(repo, env, sweep) for sweep in args.sweep)
        wall, finished = run_all(repo, env, args.jobs, args.time_limit)
        result["sweep_wall_s"], result["finished"] = round(wall, 1), finished
        rows = experiments(repo, env)
        result["experiments_done"] = len(rows)
        changed(rows, flatten(yaml.safe_load((repo / "params.yaml").read_text())))
        result["runs"] = rows
        result["by_config"] = summary(rows)
        _, table = run(["dvc", "exp", "show", "--md", "--no-pager", "--only-changed", "--drop", "data.url"], repo, env)
        (args.results / f"{args.name}.md").write_text("\n".join(line for _, line in table) + "\n")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["by_config"]))


if __name__ == "__main__":
    main()
