"""The best-val checkpoint (everything sampling needs) and the resume state (everything training needs).

Both are plain dicts of tensors, numbers and strings: written atomically, read with weights_only=True.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nanogpt import files
from nanogpt.config import model_config
from nanogpt.errors import UserError
from nanogpt.model import GPT, NANOGPT_ARCHITECTURE
from nanogpt.tokenizer import Tokenizer, tokenizer_from_dict

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
    files.torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_config": dataclasses.asdict(model.cfg),
            "vocab_size": model.vocab_size,
            "tokenizer": tokenizer.to_dict(),
            "step": step,
            "val_loss": val_loss,
        },
        path,
    )


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
    metrics: dict[str, Any]  # MetricsLog.to_state()
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


class ResumeStore:
    """Resume state kept in a folder that is not a DVC output, so `dvc repro` does not delete it.

    `state.pt` holds model, optimizers, RNGs, step and metric series; `best.pt` is a hard link to (or copy
    of) the best checkpoint, which DVC deletes with the stage's outputs before a re-run.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.state_path = self.folder / "state.pt"
        self.best_path = self.folder / "best.pt"

    def save(self, state: ResumeState, checkpoint: Path | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and checkpoint.exists():
            tmp = self.best_path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(checkpoint, tmp)
            except OSError:
                shutil.copyfile(checkpoint, tmp)
            os.replace(tmp, self.best_path)
            tmp.unlink(missing_ok=True)  # rename() is a no-op when both names link the same file
        else:  # a best.pt left by an earlier run (other params) must not be restored with this state
            self.best_path.unlink(missing_ok=True)
        files.torch_save(state.to_dict(), self.state_path)

    def load(self, key: str) -> tuple[ResumeState | None, str]:
        """The saved state if it was made with `key`, else None; and a one-line reason for the user."""
        if not self.state_path.exists():
            return None, "no resume state: starting from step 0"
        try:
            state = files.torch_load(self.state_path, "resume state")
        except UserError as exc:
            return None, f"{exc}: starting from step 0"
        if not isinstance(state, dict) or state.get("key") != key:
            return None, "resume state was made with other params, data or code: starting from step 0"
        try:
            resumed = ResumeState.from_dict(state)
        except TypeError:
            return None, f"resume state {self.state_path} is incomplete: starting from step 0"
        return resumed, f"resuming from step {resumed.step} ({self.state_path})"

    def restore_checkpoint(self, checkpoint: Path) -> None:
        """Put the best checkpoint saved with the state back at `checkpoint`."""
        if self.best_path.exists():
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_name(f".{checkpoint.name}.restore")
            shutil.copyfile(self.best_path, tmp)
            os.replace(tmp, checkpoint)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
