"""params.yaml is read once into typed dataclasses; every problem in it is reported in one message.

The tests run on the tests' own params (TINY_PARAMS). The workspace's params.yaml is read only by the tests that
pin its defaults on purpose, under "the workspace's defaults" below.
"""

import dataclasses
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import PROJECT_ROOT, TINY_PARAMS, nested, workspace_params, write_params
from nanogpt.config import Config, load_config, model_config
from nanogpt.errors import UserError

SCHEMA = PROJECT_ROOT / "params.schema.json"


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_PARAMS as a params.yaml file; don't change it."""
    return write_params(tmp_path_factory.mktemp("params") / "params.yaml", TINY_PARAMS)


def edited_params(
    tmp_path: Path, edit: dict[str, dict[str, object]] | None = None, drop: dict[str, list[str]] | None = None
) -> Path:
    """TINY_PARAMS as a params.yaml with some values replaced (`edit`) or removed (`drop`)."""
    raw = nested(TINY_PARAMS)
    for section, values in (edit or {}).items():
        raw.setdefault(section, {}).update(values)
    for section, names in (drop or {}).items():
        for name in names:
            del raw[section][name]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def problems_of(path: Path, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_tiny_params_hold_every_key_of_the_config():
    """The tests' params are complete: a key added to nanogpt/config.py must get a value in TINY_PARAMS, or the
    tests would silently run on a default they don't own (or a stage would fail with `missing ...`)."""
    keys = [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(section.type)
    ]

    missing = [key for key in keys if key not in TINY_PARAMS]
    unknown = [key for key in TINY_PARAMS if key not in keys]

    assert not missing, f"add {', '.join(missing)} to TINY_PARAMS in tests/conftest.py, with the value tests run with"
    assert not unknown, f"remove {', '.join(unknown)} from TINY_PARAMS in tests/conftest.py: not in nanogpt/config.py"


def test_dotted_overrides_replace_single_values(params):
    default = load_config(params)
    overrides = {"train.learning_rate": 3e-3, "model.n_layer": 3, "sample.top_k": 5}
    # each override must change something, or the test cannot tell an ignored override from an applied one
    assert default.train.learning_rate != 3e-3 and default.model.n_layer != 3 and default.sample.top_k != 5

    cfg = load_config(params, overrides)

    assert cfg.train.learning_rate == pytest.approx(3e-3)
    assert cfg.model.n_layer == 3
    assert cfg.sample.top_k == 5
    assert cfg.train.batch_size == default.train.batch_size  # untouched


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("\n", "\n"),  # params.yaml's "\n": a newline already, nothing to unescape
        ("\\n", "\n"),  # what a shell passes for --prompt "\n", and dvc exp run -S 'sample.prompt=\n' writes
        ("ROMEO:\\tJULIET:\\n", "ROMEO:\tJULIET:\n"),
        ("a\\\\nb", "a\\nb"),  # \\ is one backslash, and the n after it stays an n
    ],
)
def test_prompt_escapes_mean_newline_tab_and_backslash(params, typed, meant):
    assert load_config(params, {"sample.prompt": typed}).sample.prompt == meant


@pytest.mark.parametrize(
    ("typed", "named"),
    [("a\\mb\\q", "has unknown escapes \\m, \\q"), ("ends with \\", "has an unknown escape \\ at the end")],
)
def test_unknown_prompt_escapes_are_named(params, typed, named):
    with pytest.raises(UserError, match="sample.prompt " + re.escape(named) + r": use \\n \(newline\)"):
        load_config(params, {"sample.prompt": typed})


def test_override_of_unknown_section_is_rejected(params):
    message = problems_of(params, {"nosuch.thing": 1})

    assert "nosuch.thing" in message


def test_override_of_unknown_name_in_a_known_section_is_rejected(params):
    message = problems_of(params, {"train.learning_rat": 1e-3})

    assert "train.learning_rat" in message


def test_every_problem_is_reported_in_one_message(tmp_path):
    path = edited_params(
        tmp_path,
        edit={
            "model": {"n_embd": 384, "n_head": 5},
            "encode": {"val_fraction": 1.5},
            "train": {"batch_size": 0, "device": "tpu"},
            "sample": {"num_samples": "x", "colour": "red"},
        },
        drop={"data": ["timeout"]},
    )

    message = problems_of(path)

    assert "model.n_embd (384) must be divisible by model.n_head (5)" in message
    assert "encode.val_fraction must be less than 1, got 1.5" in message
    assert "train.batch_size must be greater than or equal to 1, got 0" in message
    assert "train.device" in message and "'tpu'" in message
    assert "sample.num_samples must be a valid integer, got 'x'" in message
    assert "unknown parameter sample.colour" in message
    assert "missing data.timeout" in message


def test_a_type_error_hides_no_range_error_in_the_same_section(params):
    message = problems_of(
        params,
        {
            "train.batch_size": "x",
            "train.device": "tpu",
            "train.beta1": 1.5,
            "model.n_layer": "two",
            "model.n_head": 5,
            "model.n_embd": 384,
        },
    )

    assert message.count(";") == 4
    for expected in (
        "train.batch_size must be a valid integer, got 'x'",
        "train.device must match pattern",
        "train.beta1 must be less than 1, got 1.5",
        "model.n_layer must be a valid integer, got 'two'",
        "model.n_embd (384) must be divisible by model.n_head (5)",
    ):
        assert expected in message


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("train.batch_size", "x", "train.batch_size must be a valid integer, got 'x'"),
        ("train.batch_size", 2.5, "train.batch_size must be a valid integer, got 2.5"),
        ("train.batch_size", True, "train.batch_size must be a valid integer, got True"),
        ("train.learning_rate", "fast", "train.learning_rate must be a valid number, got 'fast'"),
        ("model.gradient_checkpointing", "yes", "model.gradient_checkpointing must be a valid boolean, got 'yes'"),
        ("encode.tokenizer", "word", "encode.tokenizer must be 'char' or 'bpe', got 'word'"),
        ("train.optimizer", "sgd", "train.optimizer must be 'adamw' or 'muon', got 'sgd'"),
        (
            "sample.top_k",
            "many",
            "sample.top_k must be a valid integer, got 'many' (keep the k likeliest tokens; null: off)",
        ),
        ("train.learning_rate", None, "train.learning_rate must be a valid number, got None"),
    ],
)
def test_wrong_types_name_the_key_and_the_value(params, name, value, expected):
    message = problems_of(params, {name: value})

    assert expected in message


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("train.max_iters", 0, "train.max_iters must be greater than or equal to 1, got 0"),
        ("train.warmup_iters", -1, "train.warmup_iters must be greater than or equal to 0, got -1"),
        ("train.min_lr", 2.0, "train.min_lr must be less than or equal to 1, got 2.0"),
        ("sample.top_p", 0.0, "sample.top_p must be greater than 0, got 0.0 (nucleus sampling; null: off)"),
        ("sample.temperature", -1.0, "sample.temperature must be greater than or equal to 0, got -1.0"),
        ("model.dropout", 1.0, "model.dropout must be less than 1, got 1.0"),
        ("encode.vocab_size", 100, "encode.vocab_size must be greater than or equal to 257, got 100"),
        (
            "data.sha256",
            "abc",
            "data.sha256 must match pattern '^[0-9a-fA-F]{64}$', got 'abc' (SHA-256 of the downloaded text, 64 hex "
            "digits)",
        ),
        (
            "data.url",
            "ftp://example.com/x",
            "got 'ftp://example.com/x' (the text to train on: http://, https:// or file://)",
        ),
        ("train.learning_rate", 0, "train.learning_rate must be greater than 0, got 0.0"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_value(params, name, value, expected):
    message = problems_of(params, {name: value})

    assert expected in message


@pytest.mark.parametrize(
    "name, value",
    [
        ("train.learning_rate", float("inf")),
        ("train.learning_rate", float("nan")),
        ("train.weight_decay", float("inf")),
        ("data.timeout", float("inf")),
        ("sample.temperature", float("nan")),
        ("sample.top_p", float("nan")),
        ("model.dropout", "nan"),  # a string, as a value of --set key=nan reads, is no way around the check
    ],
)
def test_no_float_key_takes_inf_or_nan(params, name, value):
    assert f"{name} must be a finite number, got {float(value)!r}" in problems_of(params, {name: value})


@pytest.mark.parametrize("value", [1e-40, 1e-5, 5e-5])
def test_a_temperature_too_small_to_divide_by_is_rejected_with_the_fix(params, value):
    message = problems_of(params, {"sample.temperature": value})

    assert f"sample.temperature must be 0 (greedy) or at least 0.0001, got {value!r}: use 0 for greedy" in message


@pytest.mark.parametrize("value", [0, 0.0, 1e-4, 0.7])
def test_greedy_and_usable_temperatures_are_accepted(params, value):
    assert load_config(params, {"sample.temperature": value}).sample.temperature == value


def test_an_empty_prompt_is_rejected_with_the_fix(params):
    """`dvc exp run -S sample.prompt=` writes ''; sampling would have nothing to continue."""
    message = problems_of(params, {"sample.prompt": ""})

    assert "sample.prompt is empty, got '': give the text to continue, e.g. '\\n'" in message


def test_a_timeout_longer_than_a_day_is_rejected(params):
    """socket timeouts past what time_t holds would crash the download."""
    assert "data.timeout must be less than or equal to 86400, got 1e+300" in problems_of(
        params, {"data.timeout": 1e300}
    )


def test_the_readme_example_error_is_the_message_in_full(params):
    """A range error ends with what the key means; the problems are joined by semicolons. (docs/pipeline.md's example,
    on the default n_embd, which test_workspace_params_give_the_documented_defaults pins.)"""
    message = problems_of(params, {"encode.val_fraction": 1.5, "model.n_head": 5, "model.n_embd": 384})

    assert message == (
        "invalid params: encode.val_fraction must be less than 1, got 1.5 (the fraction of the text, at its end, "
        "held out for validation); model.n_embd (384) must be divisible by model.n_head (5)"
    )


def test_a_key_of_two_types_is_one_problem_naming_both(params):
    """pydantic reports a union once per option; the message names the key once, with every allowed value."""
    message = problems_of(params, {"train.compile": "fast"})

    assert message == (
        "invalid params: train.compile must be a valid boolean or 'auto', got 'fast' "
        "(torch.compile the model; auto: on for CUDA on Linux)"
    )


def test_a_section_built_from_keywords_names_its_keys_as_params_yaml_does():
    """load_checkpoint builds ModelConfig from the saved keys: its problems read as those of params.yaml."""
    saved = {
        "block_size": 0,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "dropout": 0.0,
        "rope": False,
        "qk_norm": False,
        "mlp": "gelu",
        "tie_embeddings": True,
        "colour": "red",
    }

    with pytest.raises(UserError) as info:
        model_config(saved)

    assert str(info.value).split("; ") == [
        "model.block_size must be greater than or equal to 1, got 0 (context length in tokens)",
        "missing model.gradient_checkpointing",
        "unknown parameter model.colour",
    ]


def test_without_a_path_the_params_yaml_of_the_current_folder_is_read(tmp_path, monkeypatch):
    edited_params(tmp_path, edit={"train": {"seed": 7}})
    monkeypatch.chdir(tmp_path)

    assert load_config().train.seed == 7


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_are_accepted(params, device):
    assert load_config(params, {"train.device": device}).train.device == device


def test_missing_section_is_reported(tmp_path):
    path = write_params(tmp_path / "params.yaml", {k: v for k, v in TINY_PARAMS.items() if not k.startswith("sample.")})

    assert "missing section 'sample'" in problems_of(path)


def test_unknown_section_is_reported(tmp_path):
    path = edited_params(tmp_path, edit={"extra": {"a": 1}})

    assert "unknown section 'extra'" in problems_of(path)


def test_yaml_1_1_float_strings_are_accepted(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string; a user writing it still means a number
    path = write_params(tmp_path / "params.yaml", TINY_PARAMS)
    text, replaced = re.subn(r"^( +learning_rate:) .*$", r"\1 3e-4", path.read_text(encoding="utf-8"), flags=re.M)
    assert replaced == 1, text
    path.write_text(text, encoding="utf-8")

    cfg = load_config(path)

    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert isinstance(cfg.train.learning_rate, float)


def test_integers_are_accepted_where_numbers_are_expected(params):
    cfg = load_config(params, {"train.grad_clip": 1, "sample.temperature": 0})

    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.sample.temperature == 0.0


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n", encoding="utf-8")

    message = problems_of(path)

    assert "not valid YAML" in message and str(path) in message
    assert "line 1, column 8" in message and "\n" not in message  # where, in one line


def test_yaml_that_is_not_a_mapping_is_a_user_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")

    assert "mapping" in problems_of(path)


def test_missing_params_file_is_a_user_error(tmp_path):
    path = tmp_path / "nowhere.yaml"

    message = problems_of(path)

    assert str(path) in message and "not found" in message


def schema_problems(params: dict[str, object]) -> list[str]:
    """What a JSON-schema validator (as an editor runs one) finds wrong in `params`, per params.schema.json."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(params)]


def overrides_in(args_file: Path) -> dict[str, object]:
    """The `-S key=value` pairs of a configs/*.args file, each value read as YAML (as `dvc exp run -S` reads it)."""
    words = shlex.split(args_file.read_text(encoding="utf-8"), comments=True)
    pairs = [value for flag, value in itertools.pairwise(words) if flag in ("-S", "--set-param")]
    assert pairs, f"no -S key=value in {args_file}"
    return {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in pairs)}


def test_committed_schema_is_what_the_models_generate():
    generated = subprocess.run(
        [sys.executable, "-m", "nanogpt.config", "--schema"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert generated == SCHEMA.read_text(encoding="utf-8"), (
        "params.schema.json is stale: python -m nanogpt.config --schema > params.schema.json"
    )


def test_schema_describes_every_key_and_holds_no_defaults():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    sections = schema["$defs"].values()

    # params.yaml is the only place a default lives (compile_mode's value "default" is no "default" key)
    assert '"default":' not in SCHEMA.read_text(encoding="utf-8")
    assert all(prop.get("description") for section in sections for prop in section["properties"].values())
    assert all(section["additionalProperties"] is False for section in sections)


def test_tiny_params_validate_against_the_schema():
    assert schema_problems(nested(TINY_PARAMS)) == []  # so that each rejection below is the changed key's


@pytest.mark.parametrize(
    "name, value",
    [
        ("train.batch_size", 0),
        ("train.batch_size", True),
        ("train.learning_rate", 0),
        ("train.device", "tpu"),
        ("encode.tokenizer", "word"),
        ("sample.top_p", 1.5),
        ("data.sha256", "abc"),
        ("train.learnig_rate", 0.001),
    ],
)
def test_schema_rejects_what_the_models_reject(params, name, value):
    assert schema_problems(nested({**TINY_PARAMS, name: value}))
    assert name in problems_of(params, {name: value})


# ---------------------------------------------------------------- the workspace's defaults, pinned on purpose
# These read the workspace's params.yaml (workspace_params), and only these: editing it changes no other test.
# Marked `defaults`: true on a fresh clone, which CI tests; `python -m pytest` leaves them out, since every
# `dvc exp run` in the workspace rewrites the file (the README's CPU quick start, for one).


@pytest.mark.defaults
def test_workspace_params_give_the_documented_defaults():
    """Pins the workspace params.yaml's defaults on purpose: changing one fails here, so that the README and
    BENCHMARKS.md, which quote them, are updated with it (and this test)."""
    cfg = load_config(workspace_params())

    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (6, 6, 384)
    assert cfg.model.block_size == 256
    assert cfg.model.head_size == 64
    assert cfg.model.gradient_checkpointing is False
    assert cfg.train.batch_size == 64
    # measured defaults (BENCHMARKS.md): rotary embeddings, dropout 0.3, 3000 steps and the weights'
    # moving average reach best val 1.399 (three seeds); the rest is nanoGPT's GPT
    assert cfg.model.rope is True
    assert (cfg.model.qk_norm, cfg.model.mlp, cfg.model.tie_embeddings) == (False, "gelu", True)
    assert cfg.model.dropout == 0.3
    assert cfg.train.ema == pytest.approx(0.995)
    assert cfg.train.schedule == "cosine"
    # Muon for the hidden matrices; AdamW keeps lr 1e-3 for the embeddings and norms
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.muon_learning_rate == pytest.approx(0.02)
    assert cfg.train.max_iters == 3000
    assert cfg.train.warmup_iters == 100
    assert cfg.train.min_lr == pytest.approx(0.1)
    assert cfg.train.optimizer == "muon"
    assert cfg.train.eval_iters is None
    assert cfg.train.device == "auto"
    assert cfg.train.compile == "auto"
    assert cfg.encode.tokenizer == "char"
    assert cfg.encode.val_fraction == pytest.approx(0.1)
    assert cfg.data.url.startswith("https://")
    assert len(cfg.data.sha256) == 64
    assert cfg.sample.top_k is None and cfg.sample.top_p is None
    assert cfg.sample.quantize == "auto"  # int8 on a CPU (3x the tokens/s, BENCHMARKS.md), off on a GPU
    assert cfg.sample.prompt == "\n"


@pytest.mark.defaults
def test_params_yaml_points_editors_at_the_schema():
    first_line = workspace_params().read_text(encoding="utf-8").splitlines()[0]

    assert first_line == f"# yaml-language-server: $schema={SCHEMA.name}"


@pytest.mark.defaults
def test_default_params_validate_against_the_schema():
    assert schema_problems(yaml.safe_load(workspace_params().read_text(encoding="utf-8"))) == []


@pytest.mark.defaults
@pytest.mark.parametrize("args_file", sorted((PROJECT_ROOT / "configs").glob("*.args")), ids=lambda path: path.name)
def test_each_configs_args_set_validates_against_the_schema(args_file):
    raw = yaml.safe_load(workspace_params().read_text(encoding="utf-8"))
    for key, value in overrides_in(args_file).items():
        section, _, name = key.partition(".")
        raw[section][name] = value

    assert schema_problems(raw) == []
    load_config(workspace_params(), overrides_in(args_file))  # and the models accept it
