"""Where and how the model runs: device, precision and compilation, resolved from params once."""

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import DEVICE_PATTERN
from nanogpt.errors import UserError, warn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cuda_devices() -> tuple[int, str | None]:
    """How many CUDA devices torch can use here, and, where it can use none although CUDA is installed, why.

    CUDA that is installed but cannot start (a driver too old for torch, no memory for its context under an
    address-space limit) makes torch warn on stderr, in two lines, and report no device; that warning is caught
    here and returned as the reason, for the caller's one line. (torch warns the first time only.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        for warning in caught:  # not a failure to start: let it through as torch would have
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return count, None
    # torch's wording: "CUDA initialization: <why> (Triggered internally at <file>:<line>.)"
    reasons = [
        " ".join(str(warning.message).removeprefix("CUDA initialization: ").split(" (Triggered internally")[0].split())
        for warning in caught
    ]
    return 0, "; ".join(reasons) or None


def resolve_device(name: str, local_rank: int | None = None, setting: str = "train.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a malformed name or a device this machine lacks is a UserError
    that names `setting` (the param or flag the name came from). CUDA that is installed but fails to start is
    that error for `cuda`, and for `auto` one `warning:` line before the fallback: never torch's own warning."""
    if not DEVICE_PATTERN.match(name):
        raise UserError(f"{setting} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto" or name.startswith("cuda"):
        count, failure = _cuda_devices()  # probed once: torch warns about a failed start the first time only
    if name == "auto":
        name = "cuda" if count else "mps" if torch.backends.mps.is_available() else "cpu"
        if failure:
            warn(f"{setting} is 'auto' and CUDA failed to start ({failure}): running on {name}")
    if name.startswith("cuda"):
        if failure:
            raise UserError(f"{setting} is {name!r} but CUDA failed to start ({failure}): use auto or cpu")
        if not count:
            raise UserError(f"{setting} is {name!r} but this machine has no CUDA device: use auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
        if index >= count:
            raise UserError(f"{setting} is {name!r} but only {count} CUDA device(s) exist")
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting} is 'mps' but MPS is not available here: use auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA where supported, else fp16 (with a grad scaler); fp32 off CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.dtype is bf16 but this GPU does not support it: use auto or fp16")
    return DTYPES[name]


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """`auto` compiles on CUDA under Linux, where torch.compile's Triton backend is at home: inside the captured
    step (nanogpt/step.py) too, where inductor's fused kernels make the step about 1.7x faster (BENCHMARKS.md).
    The first run on a machine pays the compilation once; compile_cache() keeps it for every later run."""
    if setting == "auto":
        return device.type == "cuda" and sys.platform.startswith("linux")
    return bool(setting)


def compile_cache() -> Path:
    """The one folder that keeps torch.compile's caches (inductor's compiled graphs, Triton's kernels) for every run
    of this user: `$NANOGPT_COMPILE_CACHE`, else `$XDG_CACHE_HOME/nanogpt-dvc/compile` (`~/.cache/...`).

    Outside the repository, so DVC never sees it and every workspace shares it: `dvc exp run`, and the temporary
    workspaces of `dvc exp run --queue` and `--temp`, all find what an earlier run compiled, and an experiment with
    the same shapes compiles nothing. The caches hold code that torch loads, so the folder is the user's own
    (never a shared temporary folder). TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, when set, win.
    """
    if folder := os.environ.get("NANOGPT_COMPILE_CACHE"):
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanogpt-dvc" / "compile"


def use_compile_cache() -> None:
    """Point torch.compile's caches at compile_cache(), unless the user pointed them elsewhere."""
    folder = compile_cache()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


def compile(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """torch.compile(fn, **options) with its caches in compile_cache(): every compiled path of the project
    (the training step, the decode step) goes through here."""
    use_compile_cache()
    return torch.compile(fn, **options)


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16/fp16; a no-op for fp32. `cache=False` for code captured in a CUDA graph."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# torch.compile modes that replay CUDA graphs, and the same mode without them
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def captures_step(
    compile_mode: str, device: torch.device, dtype: torch.dtype, world_size: int, gradient_checkpointing: bool
) -> bool:
    """Whether the whole training step is captured as one CUDA graph (nanogpt/step.py).

    That is what a CUDA-graph compile mode (reduce-overhead, max-autotune) asks for, and it is done whole
    where it can be: one process on a GPU, without fp16's grad scaler (it reads its overflow check on the
    host) and without gradient checkpointing (it saves RNG states on the host). Elsewhere torch.compile's own
    CUDA graphs serve the mode.
    """
    return (
        compile_mode in GRAPH_MODES
        and device.type == "cuda"
        and dtype != torch.float16
        and world_size == 1
        and not gradient_checkpointing
    )


def seconds_since_launch() -> float | None:
    """Wall time since this process started (Linux), so start-up (imports, CUDA init) shows in timings."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
