"""Experiment-turnaround benchmark: what one `dvc exp run` and a queue of them cost, with the real dvc.

    python -m benchmarks.experiments --data /path/to/input.txt --name h200-experiments
    python -m benchmarks.experiments --data /path/to/input.txt --name h200-experiments --baseline /path/to/old
    python -m benchmarks.experiments --table benchmarks/results/h200-experiments.json   # BENCHMARKS.md's table

Works in scratch git repositories (one per code version), never in this workspace. For the code in this
checkout, and for an older checkout given as --baseline, it measures:

- `default_exp_cold`: the first `dvc exp run` of a fresh repository (every stage) with empty
  torch.compile/Triton caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR pointed at new folders: a fresh
  machine's compile caches, though not its cold disk), with each stage's wall time from dvc's log;
- `default_exp_warm`: a second `dvc exp run` that reruns train and sample (another seed), caches warm;
- `fixed_cost_s`: the warm experiment's wall time minus its steps x the steady step time (train.json);
- `time_to_target_s`: the train stage of `--config` (a configs/*.args file, or the default params) from
  launch to its first evaluation at val loss <= --target, warm and cold (benchmarks.train's measurement);
- `sample_stage_s`: the sample stage as dvc runs it, launch to exit, warm;
- `sweep_wall_s`: 8 experiments of 500 steps queued with `dvc exp run --queue` and run with
  `dvc exp run --run-all -j N`, for each N in --jobs.

Writes benchmarks/results/<name>.json.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGE_LINE = re.compile(r"Running stage '(\w+)'")
READY = re.compile(r"ready ([\d.]+) s after launch")  # the train stage's line at its first step


def scratch_repo(source: Path, dest: Path, data_url: str) -> Path:
    """A fresh git repository holding `source`'s tracked files (all its files if it is no git checkout, e.g.
    a `git archive` of an older commit), its data.url pointed at `data_url`."""
    if (source / ".git").exists():
        # tracked and untracked-but-not-ignored files: what the checkout holds now, whatever its index says
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = listing.splitlines()
    else:
        names = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()]
    for name in names:
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    run(["git", "init", "-q"], dest)
    params = (dest / "params.yaml").read_text()
    params = re.sub(r"(?m)^(  url: ).*$", lambda m: m[1] + data_url, params)
    (dest / "params.yaml").write_text(params)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "benchmark"], dest)
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd`; its wall time and its output lines, each with the seconds since launch when it appeared."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = [(time.perf_counter() - started, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    return time.perf_counter() - started, lines


def stage_times(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds from each `Running stage` line to the next one (the last to the end of the command)."""
    starts = [(t, m[1]) for t, line in lines if (m := STAGE_LINE.search(line))]
    ends = [t for t, _ in starts[1:]] + [wall]
    return {name: round(end - start, 2) for (start, name), end in zip(starts, ends, strict=True)}


def exp_run(repo: Path, env: dict[str, str], *overrides: str) -> dict[str, Any]:
    """One `dvc exp run`: wall time, each stage's time, the train stage's ready time and its summary."""
    args = [item for o in overrides for item in ("-S", o)]
    wall, lines = run(["dvc", "exp", "run", *args], repo, env)
    summary = json.loads((repo / "metrics" / "train.json").read_text())
    step_s = summary["tokens_per_step"] / summary["tokens_per_sec"]
    return {
        "overrides": list(overrides),
        "wall_s": round(wall, 2),
        "stages_s": stage_times(lines, wall),
        "ready_s": next((float(m[1]) for _, line in lines if (m := READY.search(line))), None),
        "steps": summary["steps"],
        "steady_step_ms": round(1000 * step_s, 3),
        "fixed_cost_s": round(wall - summary["steps"] * step_s, 2),
        "best_val_loss": summary["best_val_loss"],
        "train_wall_time_s": summary.get("wall_time_s"),
    }


def sweep(repo: Path, env: dict[str, str], jobs: int) -> float:
    """Wall time of 8 queued 500-step experiments run with `jobs` workers."""
    seeds = ",".join(str(100 + i) for i in range(8))  # DVC's grid syntax: one queued experiment per value
    run(["dvc", "exp", "run", "--queue", "-S", "train.max_iters=500", "-S", f"train.seed={seeds}"], repo, env)
    wall, _ = run(["dvc", "exp", "run", "--run-all", "-j", str(jobs)], repo, env)
    run(["dvc", "queue", "remove", "--all"], repo, env)
    return round(wall, 2)


def time_to_target(repo: Path, env: dict[str, str], config: Path | None, target: float) -> float | None:
    """benchmarks.train's launch-to-target time of the train stage with the --config overrides."""
    sets = []
    if config is not None:
        args = shlex.split(config.read_text())
        sets = [
            item for flag, value in zip(args[::2], args[1::2], strict=True) if flag == "-S" for item in ("--set", value)
        ]
    out = repo / "ttt"
    run(
        [
            sys.executable,
            "-m",
            "benchmarks.train",
            "--name",
            "ttt",
            "--results",
            str(out),
            "--target",
            str(target),
            "--data",
            str(repo / "data"),
            "--params",
            str(repo / "params.yaml"),
            *sets,
        ],
        repo,
        env,
    )
    return json.loads((out / "ttt.json").read_text())["time_to_target_s"]


def measure(
    source: Path,
    work: Path,
    data_url: str,
    jobs: list[int],
    config: Path | None,
    target: float,
    out: Path,
    parts: tuple[str, ...] = ("exp", "ttt", "sweep"),
) -> dict[str, Any]:
    """Every measurement for the code in `source`; the results so far are rewritten to `out` after each."""
    repo = scratch_repo(source, work / "repo", data_url)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    cold_env = {
        **env,
        "TORCHINDUCTOR_CACHE_DIR": str(work / "cold-inductor"),
        "TRITON_CACHE_DIR": str(work / "cold-triton"),
    }
    result: dict[str, Any] = {}

    def record(key: str, value: Any) -> None:
        result[key] = value
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{source.name}: {key} = {json.dumps(value)}", flush=True)

    if "exp" in parts:
        record("default_exp_cold", exp_run(repo, cold_env))
        record("default_exp_warm", exp_run(repo, env, "train.seed=2"))
        record("fixed_cost_s", result["default_exp_warm"]["fixed_cost_s"])
        sample = [sys.executable, "-m", "stages.sample", "--vocab", "data/vocab.json", "--output", str(work / "s.txt")]
        wall, _ = run([*sample, "--metrics", str(work / "sample.json")], repo, env)
        record("sample_stage_s", round(wall, 2))
        record("sample_metrics", json.loads((work / "sample.json").read_text()))
    else:
        run(["dvc", "repro", "encode"], repo, env)  # the data the others need
    cold_ttt_env = {
        **env,
        "TORCHINDUCTOR_CACHE_DIR": str(work / "cold2-inductor"),
        "TRITON_CACHE_DIR": str(work / "cold2-triton"),
    }
    if config is not None and not config.exists():
        config = None
    record("config", config.name if config else "params.yaml defaults")
    if "ttt" in parts:
        record("time_to_target_s", time_to_target(repo, env, config, target))
        record("time_to_target_cold_s", time_to_target(repo, cold_ttt_env, config, target))
    record("sweep_jobs", jobs)
    sweeps: dict[str, float] = {}
    for j in jobs if "sweep" in parts else []:
        sweeps[str(j)] = sweep(repo, env, j)
        record("sweep_wall_s", sweeps)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The goals' rows of a result file, baseline beside this code, as BENCHMARKS.md shows them."""
    base = result.get("baseline", {})

    def cell(r: dict[str, Any], *keys: str) -> str:
        value: Any = r
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return "" if value is None else str(value)

    rows = [
        ("launch to val <= 1.47, warm (s)", ("time_to_target_s",)),
        ("launch to val <= 1.47, empty compile caches (s)", ("time_to_target_cold_s",)),
        ("config timed to the target", ("config",)),
        ("default `dvc exp run`, first in a fresh repo, empty compile caches (s)", ("default_exp_cold", "wall_s")),
        ("default `dvc exp run`, warm (s)", ("default_exp_warm", "wall_s")),
        ("its steady step (ms)", ("default_exp_warm", "steady_step_ms")),
        ("its fixed cost: wall - steps x steady step (s)", ("fixed_cost_s",)),
        ("sample stage, launch to exit (s)", ("sample_stage_s",)),
    ]
    rows += [(f"8 queued 500-step experiments, -j {j} (s)", ("sweep_wall_s", str(j))) for j in (1, 2, 4)]
    lines = ["| | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {cell(base, *keys)} | {cell(result, *keys)} |" for label, keys in rows]
    stages = [f"{k} {v}" for k, v in result.get("default_exp_cold", {}).get("stages_s", {}).items()]
    return "\n".join(lines) + "\n\nper stage, after, first run (s): " + ", ".join(stages) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, help="print the markdown table of a result file and stop")
    p.add_argument("--data", type=Path, help="a local copy of the corpus (read through file://)")
    p.add_argument("--name", help="result file name (benchmarks/results/<name>.json)")
    p.add_argument("--source", type=Path, default=ROOT, help="the code to measure (default: this checkout)")
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (measured first)")
    p.add_argument("--jobs", default="1,2,4", help="worker counts for the 8-experiment queue")
    p.add_argument("--baseline-jobs", default="4", help="worker counts for the baseline's queue")
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "speedrun.args",
        help="the -S overrides timed to the target (default configs/speedrun.args)",
    )
    p.add_argument("--baseline-config", type=Path, help="the baseline's -S overrides timed to the target")
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument(
        "--parts",
        default="exp,ttt,sweep",
        help="what to measure: exp (one experiment, cold and warm, "
        "and the sample stage), ttt (time to target), sweep (the queues)",
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if args.data is None or args.name is None:
        p.error("--data and --name are required")

    import torch

    url = "file://" + str(args.data.resolve())
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": shlex.join(["python", "-m", "benchmarks.experiments", *sys.argv[1:]]),
        "pyc": "PYTHONDONTWRITEBYTECODE" not in os.environ,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"
    with tempfile.TemporaryDirectory(prefix="nanogpt-exp-") as tmp:
        if args.baseline is not None:
            (Path(tmp) / "base").mkdir()
            jobs = [int(j) for j in args.baseline_jobs.split(",")]
            config = args.baseline_config or args.config
            base_out = args.results / f"{args.name}-baseline.json"
            result["baseline"] = measure(args.baseline, Path(tmp) / "base", url, jobs, config, args.target, base_out)
            base_out.unlink()
        (Path(tmp) / "new").mkdir()
        jobs = [int(j) for j in args.jobs.split(",")]
        new_out = args.results / f"{args.name}-partial.json"
        parts = tuple(args.parts.split(","))
        result.update(measure(args.source, Path(tmp) / "new", url, jobs, args.config, args.target, new_out, parts))
        new_out.unlink()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "baseline"}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
