"""The best-val checkpoint (everything sampling needs) and the resume state (everything training needs).

Both are plain dicts of tensors, numbers and strings: written atomically, read with weights_only=True.
"""

import contextlib
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanogpt import files
from nanogpt.config import Config, model_config
from nanogpt.errors import UserError
from nanogpt.model import GPT, NANOGPT_ARCHITECTURE
from nanogpt.tokenizer import Tokenizer, tokenizer_from_dict

if TYPE_CHECKING:  # the sample stage, which reads checkpoints, runs no optimizer code
    from nanogpt.optim import WeightAverage

CHECKPOINT_FORMAT = 1
# what save_checkpoint writes besides the format, and the type of each
CHECKPOINT_KEYS = {
    "model": dict,
    "model_config": dict,
    "vocab_size": int,
    "tokenizer": dict,
    "step": int,
    "val_loss": float,
}
RESUME_FORMAT = 2  # bump when the resume state's layout or the training trajectory's code changes


def save_checkpoint(path: Path | str, model: GPT, tokenizer: Tokenizer, step: int, val_loss: float) -> None:
    write_checkpoint(checkpoint(model, tokenizer, step, val_loss), path)


def write_checkpoint(ckpt: dict[str, Any], path: Path | str) -> None:
    """Write a `checkpoint(...)` (atomically); the training loop does it on its background writer."""
    files.torch_save(ckpt, path)


def checkpoint(model: GPT, tokenizer: Tokenizer, step: int, val_loss: float) -> dict[str, Any]:
    """What save_checkpoint writes, the weights copied to the CPU now (the model may change after)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},  # a copy on a CPU too
        "model_config": dataclasses.asdict(model.cfg),
        "vocab_size": model.vocab_size,
        "tokenizer": tokenizer.to_dict(),
        "step": step,
        "val_loss": val_loss,
    }


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model (in eval mode, on `device`), its tokenizer, and the checkpoint's step and val loss."""
    ckpt = files.torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}): "
            "retrain with `dvc repro train`"
        )
    if malformed := [f"{key} {why}" for key, kind in CHECKPOINT_KEYS.items() if (why := _malformed(ckpt, key, kind))]:
        raise UserError(f"checkpoint {path} is incomplete: {', '.join(malformed)}: retrain with `dvc repro train`")
    try:
        # a checkpoint from before an architecture option existed was made without it
        model = GPT(model_config({**NANOGPT_ARCHITECTURE, **ckpt["model_config"]}), ckpt["vocab_size"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} does not match the model code: {str(exc).splitlines()[0]}") from None
    except UserError as exc:  # a model_config key that the code no longer has, lacks, or rejects
        raise UserError(f"checkpoint {path} does not match the model code: {exc}") from None
    try:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    except ValueError as exc:
        raise UserError(f"checkpoint {path} has a corrupt tokenizer ({exc}): retrain with `dvc repro train`") from None
    if tokenizer.vocab_size != model.vocab_size:
        raise UserError(
            f"checkpoint {path}: vocabulary of {tokenizer.vocab_size} tokens does not match the "
            f"model's {model.vocab_size}: retrain with `dvc repro train`"
        )
    return model.to(device).eval(), tokenizer, {"step": ckpt["step"], "val_loss": ckpt["val_loss"]}


def _malformed(ckpt: dict[str, Any], key: str, kind: type) -> str | None:
    """Why `ckpt[key]` is not what save_checkpoint writes there (a `kind`), or None when it is."""
    if key not in ckpt:
        return "is missing"
    return None if isinstance(ckpt[key], kind) else f"is not a {kind.__name__}"


def run_key(cfg: Config, device: torch.device, dtype: torch.dtype, world_size: int, data_files: list[Path]) -> str:
    """The resume key of a training run: its params, device, precision, number of processes and data."""
    settings = {
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
        "device": device.type,
        "dtype": str(dtype),
        "world_size": world_size,
    }
    return resume_key(settings, data_files)


def resume_key(settings: dict[str, Any], data_files: list[Path]) -> str:
    """A fingerprint of everything that shapes the training trajectory: params, data, code version."""
    h = hashlib.sha256(json.dumps({"format": RESUME_FORMAT, **settings}, sort_keys=True, default=str).encode())
    for path in data_files:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


@dataclasses.dataclass
class ResumeState:
    """Everything a resumed run needs to continue exactly where it stopped; its layout is defined here once.

    Saved as a plain dict of tensors, numbers, lists and strings (`to_dict`), loaded with weights_only=True.
    """

    key: str  # resume_key of the run that saved it
    step: int  # optimizer steps done
    best_val: float
    best_step: int
    metrics: dict[str, Any]  # MetricsRecorder.state()
    elapsed: float  # seconds of training so far, so that the series' times continue
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    scaler: dict[str, Any]
    batch_rng: torch.Tensor  # the generator that draws training windows
    cpu_rng: torch.Tensor  # dropout's RNG (rank 0's)
    cuda_rng: torch.Tensor | None = None
    average: list[torch.Tensor] | None = None  # WeightAverage's, with train.ema

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "ResumeState":
        """The state in `state`; a TypeError when keys are missing or unknown."""
        return cls(**state)


@dataclasses.dataclass
class ModelAndOptimizers:
    """The model and what updates it: optimizers, grad scaler (fp16 only), the training windows' generator and
    the weights' moving average (train.ema); `state` and `load` are their part of the ResumeState."""

    model: GPT
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batch_rng: torch.Generator
    average: "WeightAverage | None"

    def state(self) -> dict[str, Any]:
        """The ResumeState fields this holds (dropout's RNG included)."""
        device = self.batch_rng.device
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "batch_rng": self.batch_rng.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "average": self.average.average if self.average is not None else None,
        }

    def load(self, state: ResumeState, restore_dropout_rng: bool) -> None:
        """Continue from `state`; dropout's RNG too where `restore_dropout_rng` (the state holds rank 0's)."""
        self.model.load_state_dict(state.model)
        for opt, opt_state in zip(self.optimizers, state.optimizers, strict=True):
            opt.load_state_dict(opt_state)
        self.scaler.load_state_dict(state.scaler)
        if self.average is not None and state.average is not None:
            self.average.load(state.average)
        self.batch_rng.set_state(state.batch_rng)
        if restore_dropout_rng:
            torch.set_rng_state(state.cpu_rng)
            if state.cuda_rng is not None:
                torch.cuda.set_rng_state(state.cuda_rng, self.batch_rng.device)


class ResumeStore:
    """The resume state of one run, in `root`/<the first 16 digits of its resume key>/: `root` is not a DVC output,
    so `dvc repro` does not delete it.

    `state.pt` holds model, optimizers, RNGs, step and metric series; `best.pt` is a hard link to (or copy of) the
    best checkpoint, which DVC deletes with the stage's outputs before a re-run. An interrupted run's state waits
    in its own folder while runs with other params come and go, until its run comes back and finishes; the newest
    KEEP states are kept, so that a workspace where many runs were stopped does not fill the disk.
    """

    KEEP = 3  # each is about three times the model's size (weights, optimizer moments, best checkpoint)

    def __init__(self, root: Path | str, key: str, interval: int = 0, max_iters: int = 0) -> None:
        self.root, self.key = Path(root), key
        self.folder = self.root / key[:16]
        self.state_path = self.folder / "state.pt"
        self.best_path = self.folder / "best.pt"
        self.interval, self.max_iters = interval, max_iters

    def due(self, step: int) -> bool:
        """Whether to save after `step`: every `interval` steps (0: only when interrupted), but not after the last
        (`max_iters`), where the run finishes instead."""
        return bool(self.interval) and step % self.interval == 0 and step < self.max_iters

    def save(self, state: ResumeState, checkpoint: Path | None) -> None:
        """Save `state` with a link to the best `checkpoint` so far (None: none yet); drop the oldest others."""
        if checkpoint is not None and checkpoint.exists():
            files.copy_file(checkpoint, self.best_path, link=True)
        else:  # a best.pt left by an earlier run must not be restored with this state
            self.best_path.unlink(missing_ok=True)
        files.torch_save(state.to_dict(), self.state_path)
        others = self._others()
        newest = sorted((p for p in others if (p / "state.pt").is_file()), key=_mtime, reverse=True)[: self.KEEP - 1]
        for path in others:  # older states, and what is no run's state (files of an earlier layout)
            if path not in newest:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def load(self) -> tuple[ResumeState | None, str]:
        """The saved state of this key's run, else None; and a one-line reason for the user."""
        if not self.state_path.exists():
            if self._others():
                return None, (
                    "resume state was made with other params, data or code: starting from step 0 "
                    f"(it stays in {self.root} for them)"
                )
            return None, "no resume state: starting from step 0"
        try:
            state = files.torch_load(self.state_path, "resume state")
        except UserError as exc:
            return None, f"{exc}: starting from step 0"
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None, "resume state was made with other params, data or code: starting from step 0"
        try:
            resumed = ResumeState.from_dict(state)
        except TypeError:
            return None, f"resume state {self.state_path} is incomplete: starting from step 0"
        return resumed, f"resuming from step {resumed.step} ({self.state_path})"

    def restore_checkpoint(self, checkpoint: Path) -> None:
        """Put the best checkpoint saved with the state back at `checkpoint`."""
        if self.best_path.exists():
            files.copy_file(self.best_path, checkpoint)

    def clear(self) -> None:
        """The run finished: remove its state (and `root`, once no other run's state waits there)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty, or not there
            self.root.rmdir()

    def _others(self) -> list[Path]:
        """What `root` holds besides this run's folder."""
        return [p for p in self.root.iterdir() if p != self.folder] if self.root.is_dir() else []


def _mtime(folder: Path) -> float:
    return (folder / "state.pt").stat().st_mtime
