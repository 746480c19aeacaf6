"""The default path's figures in one run, beside nanoGPT's recipe on the same card: what the README quotes.

    python -m benchmarks.default_path --data /path/to/input.txt --nanogpt /path/to/nanoGPT --name h100-default-path

In a scratch git repository of this checkout (never this workspace), with the real dvc:
- `exp_cold_s`: the first `dvc exp run` (every stage, seed 1337) with an empty compile cache
  (NANOGPT_COMPILE_CACHE pointed at a new folder: a fresh machine's caches, not its cold disk), which it fills;
- `exp_wall_s`: the mean wall time of two more default experiments (`-S train.seed=1`, `2`), caches warm;
  `ready_s` the train stage's "ready" line in them; `best_val_loss_mean` over the three seeds;
- `sample_stage_s`: the sample stage's command from dvc.yaml, launch to exit, warm;
- `step_ms`: the steady default step (benchmarks.step); `sample_b1_tok_s` / `sample_b64_tok_s`: steady tokens/s
  of the KV-cached generator (benchmarks.sample);
- `sweep_wall_s`: 8 queued 500-step experiments run with `dvc queue start -j 4` (`dvc exp run --run-all -j 4`);
- `nanogpt_step_ms`: with --nanogpt, the median logged iteration time of nanoGPT's shakespeare_char recipe
  (its train.py, compiled, 500 iterations) run in a scratch copy of that checkout, same card, same call.
Writes benchmarks/results/<name>.json, rewritten after each measurement.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.experiments import exp_run, run, scratch_repo, sweep

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def nanogpt_step_ms(checkout: Path, corpus: Path, work: Path, iters: int = 500) -> dict[str, Any]:
    """nanoGPT's shakespeare_char recipe for `iters` iterations: the median of its logged iteration times after the
    first 50 (compilation and the first evaluation left out)."""
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    data = copy / "data" / "shakespeare_char"
    shutil.copyfile(corpus, data / "input.txt")  # prepare.py downloads it only when it is missing
    run([sys.executable, "prepare.py"], data)
    args = [f"--max_iters={iters}", f"--eval_interval={iters}", "--log_interval=10", f"--out_dir={work / 'ng-out'}"]
    wall, lines = run([sys.executable, "train.py", "config/train_shakespeare_char.py", *args], copy)
    times = [float(m[2]) for _, line in lines if (m := NANOGPT_ITER.match(line)) and int(m[1]) >= 50]
    return {"step_ms": round(statistics.median(times), 3), "iterations": iters, "wall_s": round(wall, 2)}


def measure_experiments(repo: Path, env: dict[str, str], record: Callable[[str, Any], None]) -> None:
    """Three default experiments (seeds 1337 cold, 1 and 2 warm), then the sample stage's command alone."""
    runs = [exp_run(repo, env)]  # the compile cache is empty: this one fills it
    record("exp_cold", runs[0])
    for seed in (1, 2):
        runs.append(exp_run(repo, env, f"train.seed={seed}"))
        record("exp_warm", runs[1:])
    record("exp_cold_s", runs[0]["wall_s"])
    record("exp_wall_s", round(statistics.mean(r["wall_s"] for r in runs[1:]), 2))
    record("ready_s", max((r["ready_s"] for r in runs[1:] if r["ready_s"] is not None), default=None))
    record("best_val_loss_seeds", [r["best_val_loss"] for r in runs])
    record("best_val_loss_mean", round(statistics.mean(r["best_val_loss"] for r in runs), 4))
    # the sample stage's own command, as dvc.yaml gives it, launch to exit
    sample_cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["sample"]["cmd"]
    record("sample_stage_s", round(run(["bash", "-c", sample_cmd], repo, env)[0], 2))


def measure_step(repo: Path, env: dict[str, str], work: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.step", "--data", str(repo / "data"), "--params", str(repo / "params.yaml")]
    run([*cmd, "--results", str(work / "step"), "--name", "step"], repo, env)
    return json.loads((work / "step" / "step.json").read_text())


def measure_sampling(repo: Path, env: dict[str, str], work: Path) -> list[dict[str, Any]]:
    checkpoint = str(repo / "out" / "ckpt.pt")
    cmd = [sys.executable, "-m", "benchmarks.sample", "--checkpoint", checkpoint, "--batch-sizes", "1,64"]
    run([*cmd, "--no-reference", "--name", "sample", "--results", str(work / "sample")], repo, env)
    return json.loads((work / "sample" / "sample.json").read_text())["rows"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a local copy of the corpus (read through file://)")
    p.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT to time beside this code")
    p.add_argument("--name", required=True, help="result file name (benchmarks/results/<name>.json)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--keep", type=Path, help="work in this (new) folder and keep it: the scratch repository's outputs")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: nanogpt,exp,step,sample,sweep")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import torch

    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "pyc": "PYTHONDONTWRITEBYTECODE" not in os.environ,
        "command": shlex.join(["python", "-m", "benchmarks.default_path", *sys.argv[1:]]),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"

    def record(key: str, value: Any) -> None:
        result[key] = value
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{key} = {json.dumps(value)}", flush=True)

    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.nanogpt and "nanogpt" not in skip:
            nanogpt = nanogpt_step_ms(args.nanogpt, args.data, work)
            record("nanogpt", nanogpt)
            record("nanogpt_step_ms", nanogpt["step_ms"])
        (work / "repo").mkdir()
        repo = scratch_repo(ROOT, work / "repo", "file://" + str(args.data.resolve()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
        # a new, empty compile cache: the first experiment fills it (a fresh machine), the others reuse it
        env["NANOGPT_COMPILE_CACHE"] = str(work / "compile-cache")
        for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env.pop(name, None)
        if "exp" not in skip:
            measure_experiments(repo, env, record)
        else:
            run(["dvc", "repro", "encode"], repo, env)
        if "step" not in skip:
            step = measure_step(repo, env, work)
            record("step", step)
            record("step_ms", round(step["step_ms"], 3))
        if "sample" not in skip and (repo / "out" / "ckpt.pt").exists():
            rows = measure_sampling(repo, env, work)
            record("sample_rows", rows)
            by_batch = {r["batch"]: r["steady_tokens_per_sec"] for r in rows}
            record("sample_b1_tok_s", by_batch.get(1))
            record("sample_b64_tok_s", by_batch.get(64))
        if "sweep" not in skip:
            record("sweep_wall_s", sweep(repo, env, 4))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
