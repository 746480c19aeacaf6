"""Step benchmark: the steady time of one training step as the train stage builds it, and where that time goes.

    python -m benchmarks.step                                   # params.yaml as it is, on the GPU
    python -m benchmarks.step --set train.compile=false --name h100-eager
    python -m benchmarks.step --profile                         # a breakdown by phase (eager step, profiler)

Needs the encoded data (`dvc repro encode`). The timing runs the step the trainer runs (captured as a CUDA
graph on one GPU, compiled where train.compile says so) for --warmup steps, then times --steps steps with
device events, and one whole validation pass. --profile runs the same step uncaptured under torch.profiler and
sums the GPU time of its phases: forward and backward, each optimizer, the weights' average, evaluation.
Writes benchmarks/results/<name>.json when --name is given.
"""

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.train import parse_set
from nanogpt import data, runtime
from nanogpt.config import load_config
from nanogpt.data import TrainData
from nanogpt.optim import lr_factor, set_lr
from nanogpt.step import build_train_step
from nanogpt.train import build_model_and_optimizers

ROOT = Path(__file__).resolve().parents[1]


def build(cfg: Any, folder: Path, device: torch.device, captured: bool, compiled: bool) -> dict[str, Any]:
    """The data, model, optimizers, average and step, built as the trainer builds them."""
    dtype = runtime.resolve_dtype(cfg.train.dtype, device)
    train_data = TrainData.load(folder, cfg.model.block_size, device)
    parts = build_model_and_optimizers(cfg, train_data.tokenizer.vocab_size, device, dtype, captured)
    step = build_train_step(
        parts.model,
        parts.optimizers,
        parts.scaler,
        cfg.train,
        compiled=compiled,
        captured=captured,
        dtype=dtype,
        average=parts.average,
    )
    return {
        "model": parts.model,
        "optimizers": parts.optimizers,
        "average": parts.average,
        "step": step,
        "data": train_data,
        "rng": parts.batch_rng,
        "evalset": train_data.evalset,
        "dtype": dtype,
    }


def batches(parts: dict[str, Any], cfg: Any) -> list:
    """One step's micro-batches, drawn as the trainer draws them."""
    return parts["data"].batches(parts["rng"], cfg.train.batch_size, cfg.train.grad_accum_steps)


def time_steps(parts: dict[str, Any], cfg: Any, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step (median of 5 blocks of steps/5), after `warmup` steps; first-steps wall time."""
    launch = time.perf_counter()
    for i in range(warmup):
        set_lr(parts["optimizers"], lr_factor(i, cfg.train))
        parts["step"](batches(parts, cfg))
        if i == 1:
            runtime.synchronize(device)
            first_two = time.perf_counter() - launch
    runtime.synchronize(device)
    warm_s = time.perf_counter() - launch
    blocks = []
    per_block = max(1, steps // 5)
    for _ in range(5):
        start = time.perf_counter()  # the device is idle here: a host clock between two syncs
        for i in range(per_block):
            set_lr(parts["optimizers"], lr_factor(warmup + i, cfg.train))
            parts["step"](batches(parts, cfg))
        runtime.synchronize(device)
        blocks.append(1000 * (time.perf_counter() - start) / per_block)
    return {"step_ms": sorted(blocks)[2], "step_ms_blocks": blocks, "first_two_steps_s": first_two, "warmup_s": warm_s}


def time_eval(parts: dict[str, Any], cfg: Any, device: torch.device) -> float:
    autocast = runtime.autocast(device, parts["dtype"])
    for _ in range(2):
        data.evaluate(parts["model"], parts["evalset"], cfg.train.batch_size, autocast)
    runtime.synchronize(device)
    start = time.perf_counter()
    total, count = data.evaluate(parts["model"], parts["evalset"], cfg.train.batch_size, autocast)
    float(total / count)
    return 1000 * (time.perf_counter() - start)


def profile_step(parts: dict[str, Any], cfg: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """GPU milliseconds per step of each phase of the uncaptured step, from torch.profiler."""
    step = parts["step"]
    for i in range(5):
        set_lr(parts["optimizers"], lr_factor(i, cfg.train))
        step(batches(parts, cfg))
    runtime.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            b = batches(parts, cfg)
            with record_function("phase:forward+backward+clip"):
                step.gradients(b)
            for opt in parts["optimizers"]:
                with record_function(f"phase:{type(opt).__name__}"):
                    opt.step()
            for opt in parts["optimizers"]:
                opt.zero_grad(set_to_none=step.free_grads)
            if parts["average"] is not None:
                with record_function("phase:ema"):
                    parts["average"].update()
        with record_function("phase:evaluation"):
            autocast = runtime.autocast(device, parts["dtype"])
            data.evaluate(parts["model"], parts["evalset"], cfg.train.batch_size, autocast)
        runtime.synchronize(device)
    events = prof.key_averages()
    phases = {
        e.key: round(e.device_time_total / 1000 / (1 if e.key == "phase:evaluation" else steps), 3)
        for e in events
        if e.key.startswith("phase:")
    }
    kernels = sorted(
        (e for e in events if e.device_time_total > 0 and not e.key.startswith("phase:")),
        key=lambda e: e.self_device_time_total,
        reverse=True,
    )
    top = [
        {"kernel": e.key[:90], "ms_per_step": round(e.self_device_time_total / 1000 / steps, 4), "calls": e.count}
        for e in kernels[:25]
    ]
    wall = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    return {"phases_ms": phases, "top_kernels": top, "table": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--name", help="result file name (benchmarks/results/<name>.json)")
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="profile the uncaptured step by phase")
    args = p.parse_args()
    launched = time.perf_counter()
    cfg = load_config(args.params, parse_set(args.set))
    device = runtime.resolve_device(cfg.train.device)
    dtype = runtime.resolve_dtype(cfg.train.dtype, device)
    captured = runtime.captures_step(cfg.train.compile_mode, device, dtype, 1, cfg.model.gradient_checkpointing)
    compiled = runtime.resolve_compile(cfg.train.compile, device)
    if args.profile:
        captured = False  # the profiler needs the kernels launched one by one
    parts = build(cfg, args.data, device, captured, compiled)
    result: dict[str, Any] = {
        "name": args.name,
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python -m benchmarks.step "
        + " ".join(f"--set {s}" for s in args.set)
        + (" --profile" if args.profile else ""),
        "captured": captured,
        "compiled": compiled,
        "build_s": round(time.perf_counter() - launched, 3),
    }
    if args.profile:
        result.update(profile_step(parts, cfg, device, 20))
        print(result.pop("table"))
    else:
        result.update(time_steps(parts, cfg, args.warmup, args.steps, device))
        result["eval_ms"] = time_eval(parts, cfg, device)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))
    for row in result.get("top_kernels", []):
        print(f"{row['ms_per_step']:8.4f} ms  x{row['calls']:<5} {row['kernel']}")
    if args.name:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
