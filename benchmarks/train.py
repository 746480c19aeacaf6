"""Training benchmark: run the real train stage in a scratch folder and record speed and quality.

    python -m benchmarks.train --name h100-default                      # params.yaml as it is
    python -m benchmarks.train --set train.max_iters=200 --set train.device=cpu --name smoke
    python -m benchmarks.train --nproc 2 --name h100x2-default                # torchrun, one process a GPU

Needs the encoded data (`dvc repro encode`). Time to the target val loss is measured from the stage's
launch (interpreter start, imports, compilation and evaluation included) to the moment its log line
with that val loss appears. Writes benchmarks/results/<name>.json.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from nanogpt.config import apply_overrides, load_config
from nanogpt.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VAL_LINE = re.compile(r"^step (\d+): loss (\S+)\s+val (\S+)")
READY_LINE = re.compile(r"ready ([\d.]+) s after launch")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values parsed as YAML (as `dvc exp run -S` does)."""
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def flops_per_token(num_params: int, position_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate (PaLM appendix B): 6N plus attention's 12·L·C·T."""
    return 6 * (num_params - position_params) + 12 * n_layer * n_embd * block_size


def measure_peak_tflops(device: str) -> float | None:
    """bf16 matrix-product rate of this GPU, measured on a large square product (the MFU denominator)."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def stage_command(nproc: int) -> list[str]:
    """The train stage as one process, or through torchrun with `nproc` processes (one a GPU)."""
    if nproc == 1:
        return [sys.executable, "-m", "stages.train"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stages.train",
    ]


def run_stage(
    params: dict[str, Any], data_dir: Path, target: float, keep: Path | None, nproc: int = 1
) -> dict[str, Any]:
    """Run the train stage in a scratch folder; time every evaluation line from launch."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        (work / "data").mkdir()
        for name in ("train.pt", "val.pt", "vocab.json"):
            shutil.copyfile(data_dir / name, work / "data" / name)
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        launched = time.perf_counter()
        proc = subprocess.Popen(
            stage_command(nproc), cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        series, log, ready = [], [], None
        for line in proc.stdout:
            log.append(line.rstrip())
            print(line, end="", flush=True)
            if m := READY_LINE.search(line):
                ready = float(m[1])
            if m := VAL_LINE.match(line):
                series.append(
                    {
                        "step": int(m[1]),
                        "seconds": round(time.perf_counter() - launched, 3),
                        "train_loss": float(m[2]),
                        "val_loss": float(m[3]),
                    }
                )
        if proc.wait() != 0:
            raise SystemExit(f"train stage failed with exit code {proc.returncode}")
        wall = time.perf_counter() - launched
        summary = json.loads((work / "metrics" / "train.json").read_text())
        if keep is not None:
            shutil.copyfile(work / "out" / "ckpt.pt", keep)
    hit = next((row for row in series if row["val_loss"] <= target), None)
    return {
        "summary": summary,
        "series": series,
        "stage_wall_s": round(wall, 2),
        "ready_s": ready,
        "log": log,
        "time_to_target_s": hit["seconds"] if hit else None,
        "step_at_target": hit["step"] if hit else None,
    }


@exit_on_user_error
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--name", required=True, help="result file name (benchmarks/results/<name>.json)")
    p.add_argument("--target", type=float, default=1.47, help="val loss to time (default 1.47)")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="folder with train.pt, val.pt, vocab.json")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--keep-checkpoint", type=Path, help="copy the run's best checkpoint here")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) through torchrun (default 1: no torchrun)")
    args = p.parse_args()

    overrides = parse_set(args.set)
    cfg = load_config(args.params, overrides)  # validates before any work
    params = yaml.safe_load(args.params.read_text())
    apply_overrides(params, overrides)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    run = run_stage(params, args.data, args.target, args.keep_checkpoint, args.nproc)
    s = run["summary"]
    device = "cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else cfg.train.device
    peak = measure_peak_tflops(device)
    fpt = flops_per_token(
        s["num_params"],
        cfg.model.block_size * cfg.model.n_embd,
        cfg.model.n_layer,
        cfg.model.n_embd,
        cfg.model.block_size,
    )
    result = {
        "name": args.name,
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": "python -m benchmarks.train "
        + (f"--nproc {args.nproc} " if args.nproc > 1 else "")
        + " ".join(f"--set {s}" for s in args.set)
        + f" --name {args.name}",
        "processes": args.nproc,
        "config": {"model": vars(cfg.model), "train": vars(cfg.train)},
        "ms_per_step": round(1000 * s["tokens_per_step"] / s["tokens_per_sec"], 3) if s["tokens_per_sec"] else None,
        "tokens_per_sec": s["tokens_per_sec"],
        "peak_bf16_tflops_measured": round(peak, 1) if peak else None,
        "mfu": round(fpt * s["tokens_per_sec"] / (peak * 1e12 * args.nproc), 4) if peak else None,  # per GPU
        "peak_memory_mib": s.get("peak_memory_mib"),
        "target_val_loss": args.target,
        "time_to_target_s": run["time_to_target_s"],
        "step_at_target": run["step_at_target"],
        "best_val_loss": s["best_val_loss"],
        "best_step": s["best_step"],
        "stage_wall_s": run["stage_wall_s"],
        "ready_s": run["ready_s"],
        "summary": s,
        "series": run["series"],
        "log": run["log"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.name}: {result['ms_per_step']} ms/step, {s['tokens_per_sec']:,} tok/s, mfu {result['mfu']}, "
        f"target {args.target} at {run['time_to_target_s']} s (step {run['step_at_target']}), "
        f"best {s['best_val_loss']} at step {s['best_step']}, stage {run['stage_wall_s']} s -> {out}"
    )


if __name__ == "__main__":
    main()
