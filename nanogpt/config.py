"""Typed view of params.yaml: parsed once, validated by pydantic, every problem reported in one message.

params.yaml is the only place a default lives: a `Field(...)` holds a key's constraints and description, never a
default, so a missing key is an error. The same classes generate params.schema.json, which editors use to complete
and check params.yaml: `python -m nanogpt.config --schema`."""

import contextlib
import dataclasses
import json
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from nanogpt.errors import UserError
from nanogpt.params_file import read_params

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MIN_TEMPERATURE = 1e-4  # logits are divided by the temperature: far below this they overflow
MAX_SEED = 2**63 - 1  # the largest seed torch accepts, with room for the per-sample and per-rank offsets


def _invalid(message: str) -> PydanticCustomError:  # `message` follows the key's name in the error line
    return PydanticCustomError("params", "{message}", {"message": message})


def _yaml_float(value: Any) -> Any:
    """Ints and number strings (PyYAML reads `3e-4` as one) become floats; the strict check rejects the rest."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)  # a backslash and the character after it, if any


def _prompt(text: str) -> str:
    r"""The prompt with the escapes `\n`, `\t` and `\\` replaced by a newline, a tab and a backslash.

    A shell passes `--prompt "\n"` as a backslash and an n, as `dvc exp run -S 'sample.prompt=\n'` writes it (in
    params.yaml, "\n" is a newline already). Any other backslash is an error naming it, not a guess: a typo such as
    `\m` is caught, and an escape added later cannot change what a prompt meant. An empty prompt (`dvc exp run -S
    sample.prompt=` writes '') is an error too: sampling has nothing to continue."""
    if not text:
        raise _invalid("is empty, got '': give the text to continue, e.g. '\\n' to start at a new line")
    if unknown := sorted({m.group(0) for m in _ESCAPE.finditer(text) if m.group(1) not in _ESCAPES}):
        named = ", ".join(escape if len(escape) == 2 else "\\ at the end" for escape in unknown)
        what = "an unknown escape" if len(unknown) == 1 else "unknown escapes"
        raise _invalid(f"has {what} {named}: use \\n (newline), \\t (tab) or \\\\ (a backslash)")
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def _usable_url(url: str) -> str:
    """A URL that urllib parses, with a port in 0-65535 and, for http(s), a host (the pattern checks the scheme)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsing the port raises ValueError when it is not a number in range
    except ValueError as exc:
        raise _invalid(f"is not a valid URL ({exc}), got {url!r}") from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise _invalid(f"has no host (http://host/path), got {url!r}")
    return url


# Strictness is per type (StrictInt, ...): a strict dataclass would refuse the mapping that params.yaml is.
_FROM_YAML = BeforeValidator(_yaml_float)  # last in an Annotated[...]: before constraints it hides them from the schema
Float = Annotated[StrictFloat, _FROM_YAML]
# extra="forbid": a misspelt key is an error, not ignored; allow_inf_nan=False: no float key takes inf or nan
_SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
_URL = "the text to train on: http://, https:// or file://"
_PROMPT = "the text that samples continue, not empty; \\n, \\t and \\\\ stand for a newline, a tab and a backslash"


@dataclass(frozen=True, config=_SECTION)
class DataConfig:
    """Where the text comes from and how it is checked (stage download)."""

    url: Annotated[StrictStr, AfterValidator(_usable_url)] = Field(pattern=r"^(https?|file)://", description=_URL)
    sha256: StrictStr = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of the downloaded text, 64 hex digits")
    timeout: Float = Field(gt=0, le=86400, description="seconds without a byte before an attempt gives up (<= a day)")
    retries: StrictInt = Field(ge=0, description="extra attempts after a transient failure (timeout, HTTP 5xx, ...)")


@dataclass(frozen=True, config=_SECTION)
class EncodeConfig:
    """How the text becomes token ids (stage encode)."""

    val_fraction: Float = Field(gt=0, lt=1, description="the fraction of the text, at its end, held out for validation")
    tokenizer: Literal["char", "bpe"] = Field(description="char: one token per character; bpe: byte-level BPE")
    vocab_size: StrictInt = Field(ge=257, le=65536, description="bpe only: 256 byte tokens plus merges")


@dataclass(frozen=True, config=_SECTION)
class ModelConfig:
    """The transformer's shape (stage train; stored in the checkpoint)."""

    block_size: StrictInt = Field(ge=1, description="context length in tokens")
    n_layer: StrictInt = Field(ge=1, description="transformer blocks")
    n_head: StrictInt = Field(ge=1, description="attention heads per block")
    n_embd: StrictInt = Field(ge=1, description="embedding width, a multiple of n_head")
    dropout: Float = Field(ge=0, lt=1, description="dropout probability in training")
    gradient_checkpointing: StrictBool = Field(description="recompute activations in the backward pass to save memory")
    # architecture options; false/gelu/true is nanoGPT's GPT (model.NANOGPT_ARCHITECTURE)
    rope: StrictBool = Field(
        description="rotary position embeddings on queries and keys, in place of learned positions"
    )
    qk_norm: StrictBool = Field(description="RMS-normalise each head's queries and keys before attention")
    mlp: Literal["gelu", "relu2"] = Field(description="the MLP's activation: gelu, or relu2 (ReLU squared)")
    tie_embeddings: StrictBool = Field(description="the LM head shares its weights with the token embedding")

    @field_validator("n_embd")
    @classmethod
    def _divisible_by_n_head(cls, n_embd: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")  # absent when n_head itself is invalid: that error is reported instead
        if n_head is not None and n_embd % n_head:
            raise _invalid(f"({n_embd}) must be divisible by model.n_head ({n_head})")
        return n_embd

    @field_validator("rope")
    @classmethod
    def _even_head_size(cls, rope: bool, info: ValidationInfo) -> bool:
        n_embd, n_head = info.data.get("n_embd"), info.data.get("n_head")
        if rope and n_embd is not None and n_head is not None and (n_embd // n_head) % 2:
            raise _invalid(f"needs an even head size, model.n_embd / model.n_head is {n_embd // n_head}")
        return rope

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True, config=_SECTION)
class TrainConfig:
    """The training run (stage train)."""

    batch_size: StrictInt = Field(ge=1, description="sequences per micro-step, per process")
    learning_rate: Float = Field(gt=0, description="peak AdamW rate: embeddings and norms, everything with adamw")
    max_iters: StrictInt = Field(ge=1, description="optimizer steps")
    warmup_iters: StrictInt = Field(ge=0, description="steps of linear warmup before the decay")
    schedule: Literal["cosine", "wsd"] = Field(
        description="cosine: decay from the peak after warmup; wsd: hold the peak, then decay linearly over `cooldown`"
    )
    cooldown: Float = Field(gt=0, le=1, description="wsd only: the fraction of max_iters spent in the final decay")
    min_lr: Float = Field(ge=0, le=1, description="fraction of learning_rate reached at the end of the decay")
    weight_decay: Float = Field(ge=0, description="weight decay of the weight matrices")
    beta1: Float = Field(ge=0, lt=1, description="AdamW beta1")
    beta2: Float = Field(ge=0, lt=1, description="AdamW beta2")
    grad_clip: Float = Field(ge=0, description="clip the gradient norm to this; 0 turns clipping off")
    ema: Float = Field(ge=0, lt=1, description="decay of a moving average of the weights, evaluated and saved; 0: off")
    optimizer: Literal["adamw", "muon"] = Field(
        description="muon: Muon for the blocks' matrices, AdamW for the rest; adamw: AdamW only"
    )
    muon_learning_rate: Float = Field(gt=0, description="Muon's rate for the hidden matrices when optimizer is muon")
    grad_accum_steps: StrictInt = Field(ge=1, description="micro-steps per optimizer step")
    eval_interval: StrictInt = Field(ge=1, description="steps between evaluations")
    eval_iters: Annotated[StrictInt, Field(ge=1)] | None = Field(
        description="batches per evaluation; null: the whole validation split"
    )
    resume_interval: StrictInt = Field(
        ge=0, description="steps between resume-state saves; 0 saves only on SIGINT/SIGTERM"
    )
    device: StrictStr = Field(pattern=DEVICE_PATTERN.pattern, description="auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        description="auto: bf16 if supported, else fp16; fp32 on a CPU"
    )
    compile: StrictBool | Literal["auto"] = Field(description="torch.compile the model; auto: on for CUDA on Linux")
    compile_mode: CompileMode = Field(description="torch.compile mode; reduce-overhead replays CUDA graphs")
    seed: StrictInt = Field(ge=0, le=MAX_SEED, description="random seed of the run")
    tensorboard: StrictBool = Field(description="write TensorBoard event files under out/tensorboard")


@dataclass(frozen=True, config=_SECTION)
class SampleConfig:
    """Text generation from the best checkpoint (stage sample; flags of stages/sample.py override it)."""

    prompt: Annotated[StrictStr, AfterValidator(_prompt)] = Field(description=_PROMPT)
    num_tokens: StrictInt = Field(ge=0, description="tokens generated per sample")
    num_samples: StrictInt = Field(ge=1, description="samples generated")
    temperature: Float = Field(ge=0, description=f"softmax temperature: 0 is greedy, else >= {MIN_TEMPERATURE:g}")
    top_k: Annotated[StrictInt, Field(ge=1)] | None = Field(description="keep the k likeliest tokens; null: off")
    top_p: Annotated[StrictFloat, Field(gt=0, le=1), _FROM_YAML] | None = Field(
        description="nucleus sampling; null: off"
    )
    seed: StrictInt = Field(ge=0, le=MAX_SEED, description="random seed")
    quantize: Literal["auto", "int8"] | None = Field(
        description="auto: int8 weights on a CPU, off on a GPU; int8: int8 weights (CPU only); null: off"
    )
    compile: StrictBool = Field(description="torch.compile the decode step: faster steps after seconds of compiling")

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, temperature: float) -> float:
        if 0 < temperature < MIN_TEMPERATURE:
            raise _invalid(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}: use 0 for greedy")
        return temperature


@dataclass(frozen=True, config=_SECTION)
class Config:
    """params.yaml: every setting of the pipeline, one section per stage. DVC tracks each key per stage."""

    data: DataConfig
    encode: EncodeConfig
    model: ModelConfig
    train: TrainConfig
    sample: SampleConfig


def load_config(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """params.yaml with dotted-key overrides (`{"train.seed": 1}`) as a Config; a UserError lists every problem."""
    raw = read_params(Path(path))
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
    try:
        return _CONFIG.validate_python(raw)
    except ValidationError as exc:
        raise UserError("invalid params: " + "; ".join(_problems(exc))) from None


def model_config(saved: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a checkpoint's saved keys; a UserError names each bad key as `model.<key>`."""
    try:
        return ModelConfig(**saved)
    except ValidationError as exc:
        raise UserError("; ".join(_problems(exc, section="model"))) from None


def _problems(exc: ValidationError, section: str | None = None) -> list[str]:
    """One phrase per key: `train.batch_size must be greater than or equal to 1, got 0 (<the key's description>)`."""
    by_key: dict[str, list[Any]] = {}
    for error in exc.errors():  # a union reports one error per option (true or false, 'auto'): one phrase
        loc = [str(part) for part in ([section] if section else []) + list(error["loc"])]
        by_key.setdefault(".".join(loc[:2]), []).append(error)
    return [_problem(key, errors) for key, errors in by_key.items()]


def _problem(key: str, errors: list[Any]) -> str:
    section, _, name = key.partition(".")
    kind, value = errors[0]["type"], errors[0]["input"]
    if kind in ("missing", "missing_argument"):
        return f"missing {key}" if name else f"missing section {section!r}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown parameter {key}" if name else f"unknown section {section!r}"
    if not name:
        return f"section {section!r} must be a mapping of keys, got {value!r}"
    if kind == "params":  # the validators' own messages say all
        return f"{key} {errors[0]['msg']}"
    # pydantic's "Input should be greater than 0", "String should match pattern ...": after the key, "must ..."
    asks = " or ".join(re.sub(r"^\w+ should ", "", error["msg"]) for error in errors).replace(" or be ", " or ")
    meaning = _SECTIONS[section].__pydantic_fields__[name].description
    return f"{key} must {asks}, got {value!r} ({meaning})"


_CONFIG = TypeAdapter(Config)
_SECTIONS: dict[str, Any] = {field.name: field.type for field in dataclasses.fields(Config)}


def json_schema() -> dict[str, Any]:
    """The JSON schema of params.yaml (params.schema.json): each key's type, constraints and description."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_CONFIG.json_schema()}


if __name__ == "__main__":
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m nanogpt.config --schema > params.schema.json")
    print(json.dumps(json_schema(), indent=2))
