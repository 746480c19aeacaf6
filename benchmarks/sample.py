"""Sampling benchmark: tokens/s of the KV-cached generator at several batch sizes, and of the full-context
reference (nanoGPT's way) at batch 1, on the same card.

    python -m benchmarks.sample --checkpoint out/ckpt.pt --name h100-sample

Each setting runs three times with one Engine: the first includes warm-up (CUDA graph capture, allocator), the third is
reported as steady. `cold_start_s` is the time from the start of main() (Python and torch loaded, the GPU
untouched) to the end of the process's first generation: device start-up, checkpoint load, warm-up and the
first num_tokens tokens at batch 1. `--int8` adds rows with int8 weights (sample.quantize: int8, CPU only).
Writes benchmarks/results/<name>.json.
"""

import argparse
import copy
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from nanogpt import runtime
from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import exit_on_user_error
from nanogpt.generate import Engine
from nanogpt.quantize import quantize_int8
from nanogpt.sampling import SamplingParams, generate_reference

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def timed(fn, device: torch.device) -> float:
    runtime.synchronize(device)
    start = time.perf_counter()
    fn()
    runtime.synchronize(device)
    return time.perf_counter() - start


@exit_on_user_error
def main() -> None:
    launched = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"))
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-tokens", type=int, default=500)
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--compile", action="store_true", help="also time the cached generator with torch.compile")
    p.add_argument("--int8", action="store_true", help="also time the cached generator with int8 weights (CPU)")
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the full-context reference at batch 1",
    )
    args = p.parse_args()

    device = runtime.resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device)
    dtype = runtime.resolve_dtype("auto", device)  # as the sample stage runs: bf16 (or fp16) on CUDA
    model = model.to(dtype)
    params = SamplingParams(temperature=1.0, top_k=args.top_k, top_p=None)
    prompt = tokenizer.encode("\n")
    generators = {"kv-cache": (model, False)}  # name -> (model, compile)
    if args.compile:
        generators["kv-cache+compile"] = (model, True)
    if args.int8:
        int8 = quantize_int8(copy.deepcopy(model))
        generators["kv-cache+int8"] = (int8, False)
        if args.compile:
            generators["kv-cache+int8+compile"] = (int8, True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    settings = [(kind, b) for kind in generators for b in batches]
    if args.reference:
        settings.append(("reference", 1))
    rows, cold_start = [], None
    for kind, batch in settings:
        if kind == "reference":
            run = functools.partial(generate_reference, model, prompt, args.num_tokens, batch, params)
        else:  # one engine for the three runs, as a caller that samples again keeps it: later runs replay its graphs
            m, compile = generators[kind]
            run = functools.partial(Engine(m, batch, params, compile).generate, prompt, args.num_tokens)
        seconds = []
        for i in range(3):
            seconds.append(timed(functools.partial(run, seed=i), device))
            if cold_start is None:
                cold_start = round(time.perf_counter() - launched, 3)
        row = {
            "generator": kind,
            "batch": batch,
            "first_s": round(seconds[0], 3),
            "first_tokens_per_sec": round(args.num_tokens * batch / seconds[0]),
            "steady_tokens_per_sec": round(args.num_tokens * batch / seconds[2]),
        }
        rows.append(row)
        print(row, flush=True)
    result = {
        "name": args.name,
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "num_tokens": args.num_tokens,
        "top_k": args.top_k,
        "cold_start_s": cold_start,
        "cold_start_batch": settings[0][1],
        "command": "python -m benchmarks.sample " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
