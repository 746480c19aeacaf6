"""Typed view of params.yaml: parsed once, validated by pydantic, every problem reported in one message.

params.yaml is the only place a default lives; these dataclasses have no defaults of their own, so a
missing key is an error rather than a silent fallback. The same classes generate params.schema.json, the
JSON schema that editors use to complete and check params.yaml: `python -m nanogpt.config --schema`.
"""

import dataclasses
import functools
import json
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_URL_PATTERN = r"^(https?|file)://"
_SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
# what each pattern asks for, in the words of the error message
_PATTERN_MEANS = {
    _URL_PATTERN: "start with http://, https:// or file://",
    _SHA256_PATTERN: "be 64 hex digits",
    DEVICE_PATTERN.pattern: "be auto, cpu, cuda, cuda:N or mps",
}


def _yaml_float(value: Any) -> Any:
    """Ints and YAML 1.1 number strings (PyYAML reads `3e-4` as a string) become floats; anything else is left
    for the strict check to reject, so `true` or 'fast' is not a number."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)  # a backslash and the character after it, if any


def unescape(text: str) -> str:
    r"""Replace the escapes `\n`, `\t` and `\\` in text with a newline, a tab and a backslash.

    A shell passes `--prompt "\n"` as a backslash and an n, and `dvc exp run -S 'sample.prompt=\n'` writes them
    to params.yaml, so the prompt is unescaped where the param is read (params.yaml's "\n" in double quotes is
    already a newline and has no backslash left). Any other backslash is an error that names it rather than a
    guess: a typo such as `\m` is caught, and an escape added later cannot change what a prompt meant.
    """
    unknown = sorted({m.group(0) for m in _ESCAPE.finditer(text) if m.group(1) not in _ESCAPES})
    if unknown:
        named = ", ".join(escape if len(escape) == 2 else "\\ at the end" for escape in unknown)
        raise PydanticCustomError(
            "unknown_escape",
            "has {what} {named}: use \\n (newline), \\t (tab) or \\\\ (a backslash)",
            {"what": "an unknown escape" if len(unknown) == 1 else "unknown escapes", "named": named},
        )
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def _usable_url(url: str) -> str:
    """A URL that the download can fetch: urllib parses it, its port is a number in 0-65535, and an http(s) URL
    names a host (the scheme is checked by the pattern, before this)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsing the port raises ValueError when it is not a number in range
    except ValueError as exc:
        raise PydanticCustomError(
            "bad_url", "is not a valid URL ({reason}), got {url}", {"reason": str(exc), "url": repr(url)}
        ) from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise PydanticCustomError("bad_url", "has no host (http://host/path), got {url}", {"url": repr(url)})
    return url


# seeds that torch accepts, with room for the per-sample and per-rank offsets added to them
_SEED_RANGE = {"ge": 0, "le": 2**63 - 1}


class _DuplicateKey(yaml.YAMLError):
    """A mapping of params.yaml names one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML forbids it, and DVC
    rejects the file) rather than the last value silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges keys: not a duplicate
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice, on lines {first} and {line}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Last in a float's Annotated[...]: before its constraints it would hide them from the JSON schema.
_FROM_YAML = BeforeValidator(_yaml_float)


def _key(description: str, **constraints: Any) -> Any:
    """A field's description and constraints; both go into params.schema.json."""
    return Field(description=description, **constraints)


# extra="forbid": a misspelt key is an error, not ignored. Strictness is per field (StrictInt, StrictFloat, ...):
# a strict dataclass would refuse the mapping that params.yaml is.
_SECTION = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_SECTION)
class DataConfig:
    """Where the text comes from and how it is checked (stage download)."""

    url: Annotated[
        StrictStr,
        _key("the text to train on: http://, https:// or file://", pattern=_URL_PATTERN),
        AfterValidator(_usable_url),  # after the pattern: before it, it would hide the pattern from the schema
    ]
    sha256: Annotated[StrictStr, _key("SHA-256 of the downloaded text, 64 hex digits", pattern=_SHA256_PATTERN)]
    timeout: Annotated[StrictFloat, _key("seconds without a byte before a download attempt gives up", gt=0), _FROM_YAML]
    retries: Annotated[
        StrictInt, _key("extra attempts after a transient failure (timeout, connection error, HTTP 5xx)", ge=0)
    ]


@dataclass(frozen=True, config=_SECTION)
class EncodeConfig:
    """How the text becomes token ids (stage encode)."""

    val_fraction: Annotated[
        StrictFloat, _key("the fraction of the text, at its end, held out for validation", gt=0, lt=1), _FROM_YAML
    ]
    tokenizer: Annotated[Literal["char", "bpe"], _key("char: one token per character; bpe: byte-level BPE")]
    vocab_size: Annotated[
        StrictInt, _key("bpe only: 256 byte tokens plus merges (char's vocabulary is its characters)", ge=257, le=65536)
    ]


@dataclass(frozen=True, config=_SECTION)
class ModelConfig:
    """The transformer's shape (stage train; stored in the checkpoint)."""

    block_size: Annotated[StrictInt, _key("context length in tokens", ge=1)]
    n_layer: Annotated[StrictInt, _key("transformer blocks", ge=1)]
    n_head: Annotated[StrictInt, _key("attention heads per block", ge=1)]
    n_embd: Annotated[StrictInt, _key("embedding width, a multiple of n_head", ge=1)]
    dropout: Annotated[StrictFloat, _key("dropout probability in training", ge=0, lt=1), _FROM_YAML]
    gradient_checkpointing: Annotated[StrictBool, _key("recompute activations in the backward pass to save memory")]
    # architecture options; false/gelu/true is nanoGPT's GPT (model.NANOGPT_ARCHITECTURE)
    rope: Annotated[StrictBool, _key("rotary position embeddings on queries and keys, in place of learned positions")]
    qk_norm: Annotated[StrictBool, _key("RMS-normalise each head's queries and keys before attention")]
    mlp: Annotated[Literal["gelu", "relu2"], _key("the MLP's activation: gelu, or relu2 (ReLU squared)")]
    tie_embeddings: Annotated[StrictBool, _key("the LM head shares its weights with the token embedding")]

    @field_validator("n_embd")
    @classmethod
    def _divisible_by_n_head(cls, n_embd: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")  # absent when n_head itself is invalid: that error is reported instead
        if n_head is not None and n_embd % n_head:
            raise PydanticCustomError(
                "not_divisible",
                "({n_embd}) must be divisible by model.n_head ({n_head})",
                {"n_embd": n_embd, "n_head": n_head},
            )
        return n_embd

    @field_validator("rope")
    @classmethod
    def _even_head_size(cls, rope: bool, info: ValidationInfo) -> bool:
        n_embd, n_head = info.data.get("n_embd"), info.data.get("n_head")
        if rope and n_embd is not None and n_head is not None and (n_embd // n_head) % 2:
            raise PydanticCustomError(
                "odd_head_size",
                "needs an even head size, model.n_embd / model.n_head is {head_size}",
                {"head_size": n_embd // n_head},
            )
        return rope

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True, config=_SECTION)
class TrainConfig:
    """The training run (stage train)."""

    batch_size: Annotated[StrictInt, _key("sequences per micro-step (per process)", ge=1)]
    learning_rate: Annotated[
        StrictFloat, _key("peak AdamW rate (embeddings and norms; everything with adamw)", gt=0), _FROM_YAML
    ]
    max_iters: Annotated[StrictInt, _key("optimizer steps", ge=1)]
    warmup_iters: Annotated[StrictInt, _key("steps of linear warmup before the decay", ge=0)]
    schedule: Annotated[
        Literal["cosine", "wsd"],
        _key("cosine: decay from the peak after warmup; wsd: hold the peak, then decay linearly over `cooldown`"),
    ]
    cooldown: Annotated[
        StrictFloat, _key("wsd only: the fraction of max_iters spent in the final linear decay", gt=0, le=1), _FROM_YAML
    ]
    min_lr: Annotated[
        StrictFloat, _key("fraction of learning_rate reached at the end of the decay", ge=0, le=1), _FROM_YAML
    ]
    weight_decay: Annotated[StrictFloat, _key("weight decay of the weight matrices", ge=0), _FROM_YAML]
    beta1: Annotated[StrictFloat, _key("AdamW beta1", ge=0, lt=1), _FROM_YAML]
    beta2: Annotated[StrictFloat, _key("AdamW beta2", ge=0, lt=1), _FROM_YAML]
    grad_clip: Annotated[StrictFloat, _key("clip the gradient norm to this; 0 turns clipping off", ge=0), _FROM_YAML]
    ema: Annotated[
        StrictFloat,
        _key("decay of a moving average of the weights, which is evaluated and checkpointed; 0: off", ge=0, lt=1),
        _FROM_YAML,
    ]
    optimizer: Annotated[
        Literal["adamw", "muon"], _key("muon: Muon for the blocks' matrices, AdamW for the rest; adamw: AdamW only")
    ]
    muon_learning_rate: Annotated[
        StrictFloat, _key("Muon's rate for the hidden matrices when optimizer is muon", gt=0), _FROM_YAML
    ]
    grad_accum_steps: Annotated[StrictInt, _key("micro-steps per optimizer step", ge=1)]
    eval_interval: Annotated[StrictInt, _key("steps between evaluations", ge=1)]
    eval_iters: Annotated[
        Annotated[StrictInt, Field(ge=1)] | None, _key("batches per evaluation; null: the whole validation split")
    ]
    resume_interval: Annotated[
        StrictInt, _key("steps between resume-state saves; 0 saves only on SIGINT/SIGTERM", ge=0)
    ]
    device: Annotated[StrictStr, _key("auto, cpu, cuda, cuda:N or mps", pattern=DEVICE_PATTERN.pattern)]
    dtype: Annotated[
        Literal["auto", "bf16", "fp16", "fp32"],
        _key("auto: bf16 where supported, else fp16 with a grad scaler; fp32 on a CPU"),
    ]
    compile: Annotated[StrictBool | Literal["auto"], _key("torch.compile the model; auto: on for CUDA on Linux")]
    compile_mode: Annotated[
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        _key("torch.compile mode; reduce-overhead replays CUDA graphs"),
    ]
    seed: Annotated[StrictInt, _key("random seed of the run", **_SEED_RANGE)]
    tensorboard: Annotated[StrictBool, _key("write TensorBoard event files under out/tensorboard")]


@dataclass(frozen=True, config=_SECTION)
class SampleConfig:
    """Text generation from the best checkpoint (stage sample; flags of stages/sample.py override it)."""

    prompt: Annotated[
        StrictStr,
        AfterValidator(unescape),
        _key("the text that samples continue; \\n, \\t and \\\\ stand for a newline, a tab and a backslash"),
    ]
    num_tokens: Annotated[StrictInt, _key("tokens generated per sample", ge=0)]
    num_samples: Annotated[StrictInt, _key("samples generated", ge=1)]
    temperature: Annotated[StrictFloat, _key("softmax temperature; 0 is greedy", ge=0), _FROM_YAML]
    top_k: Annotated[Annotated[StrictInt, Field(ge=1)] | None, _key("keep the k likeliest tokens; null: off")]
    top_p: Annotated[
        Annotated[StrictFloat, Field(gt=0, le=1), _FROM_YAML] | None,
        _key("nucleus sampling: keep this much probability; null: off"),
    ]
    seed: Annotated[StrictInt, _key("random seed", **_SEED_RANGE)]
    quantize: Annotated[
        Literal["auto", "int8"] | None,
        _key("auto: int8 weights on a CPU, off on a GPU; int8: int8 weights (CPU only); null: off"),
    ]
    compile: Annotated[StrictBool, _key("torch.compile the decode step: faster steps after seconds of compiling")]


@dataclass(frozen=True, config=_SECTION)
class Config:
    """params.yaml: every setting of the pipeline, one section per stage. DVC tracks each key per stage."""

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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root or pass --params") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory: pass the params file, e.g. --params params.yaml") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): give a YAML params file") from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}: keep one (DVC rejects the file too)") from None
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
    try:
        return _CONFIG.validate_python(raw)
    except ValidationError as exc:
        raise UserError("invalid params: " + "; ".join(problems(exc))) from None


def problems(exc: ValidationError) -> list[str]:
    """pydantic's errors, from validating a Config or one section, as one phrase per bad key that names the key
    (`section.name`), the value and what is allowed: `train.batch_size must be >= 1, got 0`."""
    found: dict[tuple[str | int, ...], str] = {}
    for error in exc.errors():
        loc = error["loc"] if exc.title == Config.__name__ else (_SECTION_NAMES[exc.title], *error["loc"])
        if loc[:2] not in found:  # a union reports one error per option (true or false, 'auto'): one is enough
            found[loc[:2]] = _problem(*map(str, loc[:2]), error=error)
    return list(found.values())


def json_schema() -> dict[str, Any]:
    """The JSON schema of params.yaml (params.schema.json): each key's type, constraints and description."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_CONFIG.json_schema()}


_CONFIG = TypeAdapter(Config)
_SECTIONS: dict[str, Any] = {field.name: field.type for field in dataclasses.fields(Config)}
_SECTION_NAMES = {cls.__name__: name for name, cls in _SECTIONS.items()}
_TYPE_WORDS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string"}


def _problem(section: str, name: str = "", *, error: Any) -> str:
    key, kind, value = f"{section}.{name}", error["type"], error["input"]
    if kind in ("missing", "missing_argument"):
        return f"missing {key}" if name else f"missing section {section!r}"
    if kind == "unexpected_keyword_argument":
        return f"unknown parameter {key}" if name else f"unknown section {section!r}"
    if not name:
        return f"section {section!r} must be a mapping of keys, got {value!r}"
    if kind in ("not_divisible", "odd_head_size", "unknown_escape", "bad_url"):
        return f"{key} {error['msg']}"
    if kind == "string_pattern_mismatch":
        return f"{key} must {_PATTERN_MEANS[error['ctx']['pattern']]}, got {value!r}"
    schema = _section_schema(section)["properties"][name]
    options = schema.get("anyOf", [schema])
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        allowed = [_range(option) for option in options]
        allowed.sort(key=lambda words: words != "null")  # `null or >= 1`: the range last, next to the value
        meaning = f" ({schema['description']})" if "description" in schema else ""  # e.g. "0 is greedy"
    else:
        allowed, meaning = [_kind(option) for option in options], ""
    return f"{key} must be {' or '.join(allowed)}, got {value!r}{meaning}"


@functools.cache
def _section_schema(section: str) -> dict[str, Any]:
    return TypeAdapter(_SECTIONS[section]).json_schema()


def _kind(option: dict[str, Any]) -> str:
    """The type one option of a key's schema allows, in words: `an integer`, `one of 'char', 'bpe'`."""
    if "enum" in option:
        return "one of " + ", ".join(map(repr, option["enum"]))
    if "const" in option:
        return repr(option["const"])
    return _TYPE_WORDS.get(option["type"], option["type"])


def _range(option: dict[str, Any]) -> str:
    """The values one option of a key's schema allows, in words: `>= 1`, `in [0, 1)`, `null`."""
    if option["type"] == "null":
        return "null"
    low, high = (
        option.get("minimum", option.get("exclusiveMinimum")),
        option.get("maximum", option.get("exclusiveMaximum")),
    )
    if low is not None and high is not None:
        return f"in {'[' if 'minimum' in option else '('}{low}, {high}{']' if 'maximum' in option else ')'}"
    if low is not None:
        return f"{'>=' if 'minimum' in option else '>'} {low}"
    return f"{'<=' if 'maximum' in option else '<'} {high}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m nanogpt.config --schema > params.schema.json")
    print(json.dumps(json_schema(), indent=2))
