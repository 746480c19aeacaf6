"""Typed view of params.yaml: parsed once, validated with every problem reported in one message.

params.yaml is the only place a default lives; these dataclasses have no defaults of their own, so a
missing key is an error rather than a silent fallback.
"""

import dataclasses
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
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not isinstance(raw.get(section), dict) or not name:
            raise UserError(f"unknown parameter {key!r}: use section.name, e.g. train.learning_rate")
        raw[section][name] = value
    return config_from_dict(raw)


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
        sections[field.name] = _build_section(section_type, field.name, values, problems)
    for name in sorted(set(raw) - {f.name for f in dataclasses.fields(Config)}):
        problems.append(f"unknown section {name!r}")
    for name, section in sections.items():
        if section is not None:
            problems.extend(_RANGE_CHECKS[name](section))
    if problems:
        raise UserError("invalid params: " + "; ".join(problems))
    return Config(**sections)


def _build_section(cls: type, section: str, values: dict[str, Any], problems: list[str]) -> Any:
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
    return cls(**kwargs) if len(kwargs) == len(hints) else None


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
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


def _failed(checks: list[tuple[bool, str]]) -> list[str]:
    return [message for ok, message in checks if not ok]


def _check_data(d: DataConfig) -> list[str]:
    return _failed([
        (d.url.split("://")[0] in ("http", "https", "file") and "://" in d.url,
         f"data.url must start with http://, https:// or file://, got {d.url!r}"),
        (re.fullmatch(r"[0-9a-fA-F]{64}", d.sha256) is not None,
         f"data.sha256 must be 64 hex digits, got {d.sha256!r}"),
        (d.timeout > 0, f"data.timeout must be > 0, got {d.timeout}"),
        (d.retries >= 0, f"data.retries must be >= 0, got {d.retries}"),
    ])


def _check_encode(e: EncodeConfig) -> list[str]:
    return _failed([
        (0 < e.val_fraction < 1, f"encode.val_fraction must be in (0, 1), got {e.val_fraction}"),
        (257 <= e.vocab_size <= 65536,
         f"encode.vocab_size must be in [257, 65536] (256 bytes plus merges), got {e.vocab_size}"),
    ])


def _check_model(m: ModelConfig) -> list[str]:
    return _failed([
        (m.block_size >= 1, f"model.block_size must be >= 1, got {m.block_size}"),
        (m.n_layer >= 1, f"model.n_layer must be >= 1, got {m.n_layer}"),
        (m.n_head >= 1, f"model.n_head must be >= 1, got {m.n_head}"),
        (m.n_embd >= 1, f"model.n_embd must be >= 1, got {m.n_embd}"),
        (m.n_head < 1 or m.n_embd % m.n_head == 0,
         f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})"),
        (0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}"),
    ])


def _check_train(t: TrainConfig) -> list[str]:
    return _failed([
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}"),
        (t.muon_learning_rate > 0, f"train.muon_learning_rate must be > 0, got {t.muon_learning_rate}"),
        (t.max_iters >= 1, f"train.max_iters must be >= 1, got {t.max_iters}"),
        (t.warmup_iters >= 0, f"train.warmup_iters must be >= 0, got {t.warmup_iters}"),
        (0 <= t.min_lr <= 1, f"train.min_lr must be in [0, 1] (a fraction of learning_rate), got {t.min_lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (0 <= t.beta1 < 1, f"train.beta1 must be in [0, 1), got {t.beta1}"),
        (0 <= t.beta2 < 1, f"train.beta2 must be in [0, 1), got {t.beta2}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 turns it off), got {t.grad_clip}"),
        (t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}"),
        (t.eval_interval >= 1, f"train.eval_interval must be >= 1, got {t.eval_interval}"),
        (t.eval_iters is None or t.eval_iters >= 1,
         f"train.eval_iters must be null (whole split) or >= 1, got {t.eval_iters}"),
        (t.resume_interval >= 0, f"train.resume_interval must be >= 0, got {t.resume_interval}"),
        (DEVICE_PATTERN.match(t.device) is not None,
         f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}"),
    ])


def _check_sample(s: SampleConfig) -> list[str]:
    return _failed([
        (s.num_tokens >= 0, f"sample.num_tokens must be >= 0, got {s.num_tokens}"),
        (s.num_samples >= 1, f"sample.num_samples must be >= 1, got {s.num_samples}"),
        (s.temperature >= 0, f"sample.temperature must be >= 0 (0 is greedy), got {s.temperature}"),
        (s.top_k is None or s.top_k >= 1, f"sample.top_k must be null or >= 1, got {s.top_k}"),
        (s.top_p is None or 0 < s.top_p <= 1, f"sample.top_p must be null or in (0, 1], got {s.top_p}"),
    ])


_RANGE_CHECKS = {
    "data": _check_data,
    "encode": _check_encode,
    "model": _check_model,
    "train": _check_train,
    "sample": _check_sample,
}
