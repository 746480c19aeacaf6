"""Typed view of params.yaml: parsed once, validated with every problem reported in one message.

params.yaml is the only place a default lives; these dataclasses have no defaults of their own, so a
missing key is an error rather than a silent fallback.
"""

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nanogpt.errors import UserError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DataConfig:
    url: str
    sha256: str
    timeout: float  # seconds without a byte before a download attempt gives up
    retries: int  # extra attempts after a transient failure (timeout, connection error, HTTP 5xx)


@dataclass(frozen=True)
class EncodeConfig:
    val_fraction: float
    tokenizer: Literal["char", "bpe"]
    vocab_size: int  # BPE only; the char tokenizer's vocabulary is the set of characters


@dataclass(frozen=True)
class ModelConfig:
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    gradient_checkpointing: bool

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    learning_rate: float
    max_iters: int
    warmup_iters: int
    min_lr: float  # fraction of learning_rate reached at the end of the cosine decay
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float  # 0 turns clipping off
    optimizer: Literal["adamw", "muon"]
    muon_learning_rate: float  # for the hidden matrices when optimizer is muon
    grad_accum_steps: int
    eval_interval: int
    eval_iters: int | None  # None: the whole validation split every evaluation
    resume_interval: int  # steps between resume-state saves; 0 saves only on SIGINT/SIGTERM
    device: str
    dtype: Literal["auto", "bf16", "fp16", "fp32"]
    compile: bool | Literal["auto"]
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    seed: int
    tensorboard: bool


@dataclass(frozen=True)
class SampleConfig:
    prompt: str
    num_tokens: int
    num_samples: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    quantize: Literal["int8"] | None  # int8 weights: faster sampling on a CPU
    compile: bool  # torch.compile the decode step: faster steps after seconds of compiling


@dataclass(frozen=True)
class Config:
    data: DataConfig
    encode: EncodeConfig
    model: ModelConfig
    train: TrainConfig
    sample: SampleConfig


def load_config(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml, apply dotted-key overrides (`{"train.seed": 1}`), validate, and return a Config.

    Raises UserError listing every problem found, so the user fixes them in one go.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections (data, encode, model, train, sample)")
    apply_overrides(raw, overrides or {})
    return config_from_dict(raw)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys (`{"train.seed": 1}`) in the parsed params mapping, in place, as `dvc exp run -S` does."""
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not isinstance(raw.get(section), dict) or not name:
            raise UserError(f"unknown parameter {key!r}: use section.name, e.g. train.learning_rate")
        raw[section][name] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain mapping (the parsed params.yaml)."""
    problems: list[str] = []
    sections = {}
    for field in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[field.name]
        values = raw.get(field.name)
        if not isinstance(values, dict):
            problems.append(f"missing section {field.name!r}")
            continue
        valid = _typed_values(section_type, field.name, values, problems)
        problems.extend(_range_problems(field.name, valid))
        if len(valid) == len(typing.get_type_hints(section_type)):
            sections[field.name] = section_type(**valid)
    for name in sorted(set(raw) - {f.name for f in dataclasses.fields(Config)}):
        problems.append(f"unknown section {name!r}")
    if problems:
        raise UserError("invalid params: " + "; ".join(problems))
    return Config(**sections)


def _typed_values(cls: type, section: str, values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The section's values that have the right type; a problem for each missing, mistyped or unknown key."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, hint in hints.items():
        key = f"{section}.{name}"
        if name not in values:
            problems.append(f"missing {key}")
            continue
        ok, value = _coerce(values[name], hint)
        if ok:
            kwargs[name] = value
        else:
            problems.append(f"{key} must be {_describe(hint)}, got {values[name]!r}")
    for name in sorted(set(values) - set(hints)):
        problems.append(f"unknown parameter {section}.{name}")
    return kwargs


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:  # noqa: PLR0911, PLR0912  one flat case per kind of hint
    """Check `value` against a type hint; floats also accept ints and YAML 1.1 strings like '3e-4'."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, coerced = _coerce(value, option)
            if ok:
                return True, coerced
        return False, None
    if origin is Literal:
        return value in typing.get_args(hint), value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported type hint {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _range_problems(section: str, valid: dict[str, Any]) -> list[str]:
    """Messages of the section's rules that fail; a rule whose keys are missing or mistyped is skipped,
    so a type error in one key hides no range error in another."""
    problems = []
    for rule, message in _RULES[section]:
        names = inspect.signature(rule).parameters
        if all(name in valid for name in names):
            args = {name: valid[name] for name in names}
            if not rule(**args):
                problems.append(f"{section}.{message.format(**args)}")
    return problems


# Each rule is a predicate over some keys of a section (its parameter names) and the message when it fails.
_RULES: dict[str, list[tuple[Any, str]]] = {
    "data": [
        (
            lambda url: "://" in url and url.split("://")[0] in ("http", "https", "file"),
            "url must start with http://, https:// or file://, got {url!r}",
        ),
        (
            lambda sha256: re.fullmatch(r"[0-9a-fA-F]{64}", sha256) is not None,
            "sha256 must be 64 hex digits, got {sha256!r}",
        ),
        (lambda timeout: timeout > 0, "timeout must be > 0, got {timeout}"),
        (lambda retries: retries >= 0, "retries must be >= 0, got {retries}"),
    ],
    "encode": [
        (lambda val_fraction: 0 < val_fraction < 1, "val_fraction must be in (0, 1), got {val_fraction}"),
        (
            lambda vocab_size: 257 <= vocab_size <= 65536,
            "vocab_size must be in [257, 65536] (256 bytes plus merges), got {vocab_size}",
        ),
    ],
    "model": [
        (lambda block_size: block_size >= 1, "block_size must be >= 1, got {block_size}"),
        (lambda n_layer: n_layer >= 1, "n_layer must be >= 1, got {n_layer}"),
        (lambda n_head: n_head >= 1, "n_head must be >= 1, got {n_head}"),
        (lambda n_embd: n_embd >= 1, "n_embd must be >= 1, got {n_embd}"),
        (
            lambda n_embd, n_head: n_head < 1 or n_embd % n_head == 0,
            "n_embd ({n_embd}) must be divisible by model.n_head ({n_head})",
        ),
        (lambda dropout: 0 <= dropout < 1, "dropout must be in [0, 1), got {dropout}"),
    ],
    "train": [
        (lambda batch_size: batch_size >= 1, "batch_size must be >= 1, got {batch_size}"),
        (lambda learning_rate: learning_rate > 0, "learning_rate must be > 0, got {learning_rate}"),
        (lambda muon_learning_rate: muon_learning_rate > 0, "muon_learning_rate must be > 0, got {muon_learning_rate}"),
        (lambda max_iters: max_iters >= 1, "max_iters must be >= 1, got {max_iters}"),
        (lambda warmup_iters: warmup_iters >= 0, "warmup_iters must be >= 0, got {warmup_iters}"),
        (lambda min_lr: 0 <= min_lr <= 1, "min_lr must be in [0, 1] (a fraction of learning_rate), got {min_lr}"),
        (lambda weight_decay: weight_decay >= 0, "weight_decay must be >= 0, got {weight_decay}"),
        (lambda beta1: 0 <= beta1 < 1, "beta1 must be in [0, 1), got {beta1}"),
        (lambda beta2: 0 <= beta2 < 1, "beta2 must be in [0, 1), got {beta2}"),
        (lambda grad_clip: grad_clip >= 0, "grad_clip must be >= 0 (0 turns it off), got {grad_clip}"),
        (lambda grad_accum_steps: grad_accum_steps >= 1, "grad_accum_steps must be >= 1, got {grad_accum_steps}"),
        (lambda eval_interval: eval_interval >= 1, "eval_interval must be >= 1, got {eval_interval}"),
        (
            lambda eval_iters: eval_iters is None or eval_iters >= 1,
            "eval_iters must be null (whole split) or >= 1, got {eval_iters}",
        ),
        (lambda resume_interval: resume_interval >= 0, "resume_interval must be >= 0, got {resume_interval}"),
        (
            lambda device: DEVICE_PATTERN.match(device) is not None,
            "device must be auto, cpu, cuda, cuda:N or mps, got {device!r}",
        ),
    ],
    "sample": [
        (lambda num_tokens: num_tokens >= 0, "num_tokens must be >= 0, got {num_tokens}"),
        (lambda num_samples: num_samples >= 1, "num_samples must be >= 1, got {num_samples}"),
        (lambda temperature: temperature >= 0, "temperature must be >= 0 (0 is greedy), got {temperature}"),
        (lambda top_k: top_k is None or top_k >= 1, "top_k must be null or >= 1, got {top_k}"),
        (lambda top_p: top_p is None or 0 < top_p <= 1, "top_p must be null or in (0, 1], got {top_p}"),
    ],
}
