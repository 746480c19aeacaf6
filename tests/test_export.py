"""The Hugging Face export: transformers' AutoModelForCausalLM and AutoTokenizer load out/hf/ without remote code,
and the model computes what this project's model computes (logits, KV-cached greedy text, tokens) for every
architecture the export expresses: learned or rotary positions, GELU or ReLU squared, tied or untied embeddings;
a char and a BPE tokenizer. What it cannot express is refused with one line, and the export stage then leaves a
README.md that says why, so that `dvc exp run` of such an option still succeeds.

The checkpoints are tiny models trained for a few dozen steps here, with a context long enough (128) for transformers
to generate 100 tokens, which it does without sliding the window as this project's sampler does. The pipeline tests
run the real `dvc` CLI: the export is a stage, so `dvc repro` leaves out/hf/.
"""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from conftest import (
    PROJECT_ROOT,
    TINY_PARAMS,
    dvc,
    make_corpus,
    output,
    ran_stages,
    restored_stages,
    run_stage,
    tiny_config,
    tool_env,
    write_params,
)
from nanogpt.checkpoint import load_checkpoint, save_checkpoint
from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.export import export_checkpoint, export_hf
from nanogpt.generate import generate  # the project's sampler: the one import of it here
from nanogpt.model import GPT
from nanogpt.sampling import SamplingParams
from nanogpt.tokenizer import BpeTokenizer, CharTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

MODEL = {"model.block_size": 128, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.dropout": 0.0}
PROMPT = "ROMEO:\nGood night, sweet; my lord!\n"
VAL_LOSS, VAL_BPC = 2.5, 3.6  # what the training summary says; the export copies them into the model card
GREEDY = SamplingParams(temperature=0.0, top_k=None, top_p=None)
# fp32 logits up to about 10: learned positions give the same logits to the bit; rotary ones differ by rounding
# (transformers computes the angles as position * frequency, model.Rotary takes them from a table), the largest
# measured here 6e-6
LOGITS_ATOL = 2e-5

# every architecture the export expresses, with the class that loads it; the defaults' (rotary, GELU, tied) first
ARCHITECTURES = [
    {"model.rope": rope, "model.mlp": mlp, "model.tie_embeddings": tie}
    for rope, mlp, tie in itertools.product((True, False), ("gelu", "relu2"), (True, False))
]


def arch_id(arch: dict[str, object]) -> str:
    positions = "rope" if arch["model.rope"] else "learned"
    return f"{positions}-{arch['model.mlp']}-{'tied' if arch['model.tie_embeddings'] else 'untied'}"


class Export(NamedTuple):
    folder: Path  # the Hugging Face folder
    checkpoint: Path
    tokenizer: Tokenizer
    text: str  # the text the model was trained on
    arch: dict[str, object]


def train_tiny(model: GPT, tokenizer: Tokenizer, text: str, steps: int = 120) -> GPT:
    """`model` after it has learned a little (so its greedy text is not constant), in about a second."""
    data = torch.tensor(tokenizer.encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        starts = torch.randint(len(data) - 65, (8,))
        x = torch.stack([data[i : i + 64] for i in starts])  # (8, 64)
        y = torch.stack([data[i + 1 : i + 65] for i in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def make_export(folder: Path, kind: str, arch: dict[str, object]) -> Export:
    text = make_corpus(20_000).decode()
    tokenizer = CharTokenizer.fit(text) if kind == "char" else BpeTokenizer.fit(text, 300)
    cfg = tiny_config({**MODEL, **arch, "encode.tokenizer": kind, "encode.vocab_size": 300})
    torch.manual_seed(0)
    model = train_tiny(GPT(cfg.model, tokenizer.vocab_size), tokenizer, text)
    checkpoint, summary = folder / "ckpt.pt", folder / "train.json"
    save_checkpoint(checkpoint, model, tokenizer, step=120, val_loss=VAL_LOSS)
    summary.write_text(json.dumps({"best_val_loss": VAL_LOSS, "best_val_bpc": VAL_BPC}))
    assert export_checkpoint(checkpoint, summary, cfg, folder / "hf") is None
    return Export(folder / "hf", checkpoint, tokenizer, text, arch)


@pytest.fixture(
    scope="module",
    params=[("char", arch) for arch in ARCHITECTURES] + [("bpe", ARCHITECTURES[0])],
    ids=[f"char-{arch_id(a)}" for a in ARCHITECTURES] + [f"bpe-{arch_id(ARCHITECTURES[0])}"],
)
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Export:
    kind, arch = request.param
    return make_export(tmp_path_factory.mktemp(kind), kind, arch)


def load_hf(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def test_transformers_gives_the_same_logits(export: Export) -> None:
    ours, _, _ = load_checkpoint(export.checkpoint)
    hf = load_hf(export.folder)
    data = torch.tensor(export.tokenizer.encode(export.text[-5000:]))
    windows = torch.stack([data[i : i + 128] for i in range(0, 400, 100)])  # (4, 128), full context

    with torch.no_grad():
        expected, _ = ours(windows)
        logits = hf(windows).logits

    assert hf.dtype == torch.float32
    assert type(hf).__name__ == ("Starcoder2ForCausalLM" if export.arch["model.rope"] else "GPT2LMHeadModel")
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_greedy_generate_gives_the_same_100_tokens(export: Export) -> None:
    ours, _, _ = load_checkpoint(export.checkpoint)
    hf = load_hf(export.folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export.folder)
    inputs = tokenizer("ROMEO:\n", return_tensors="pt")  # input_ids and attention_mask, as a user passes them

    expected = generate(ours, export.tokenizer.encode("ROMEO:\n"), 100, 1, GREEDY, seed=0)
    out = hf.generate(**inputs, do_sample=False, max_new_tokens=100, use_cache=True)  # KV-cached

    assert out[0, inputs["input_ids"].shape[1] :].tolist() == expected[0].tolist()
    assert len(set(expected[0].tolist())) > 1  # the greedy path changes token at least once


def test_tokenizer_round_trips_the_prompt(export: Export) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(export.folder)

    ids = tokenizer(PROMPT)["input_ids"]

    assert ids == export.tokenizer.encode(PROMPT)
    assert tokenizer.decode(ids) == PROMPT


def test_embeddings_are_tied_as_trained_and_saved_once(export: Export) -> None:
    from safetensors import safe_open

    hf = load_hf(export.folder)
    with safe_open(export.folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())

    tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == export.arch["model.tie_embeddings"]
    # transformers 4 ties by the config alone, overwriting a saved lm_head.weight
    assert hf.config.tie_word_embeddings == export.arch["model.tie_embeddings"]
    assert ("lm_head.weight" in keys) != export.arch["model.tie_embeddings"]


def test_model_card_reports_the_architecture_scores_and_usage(export: Export) -> None:
    card = (export.folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)

    assert metadata["library_name"] == "transformers"
    scores = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"loss": VAL_LOSS, "bits_per_character": VAL_BPC}
    for section in ("## Architecture", "## Training data", "## Hyperparameters", "## Evaluation", "## How to use"):
        assert section in body
    assert "| `model.n_layer` | 2 |" in body
    assert f"| `model.rope` | {export.arch['model.rope']} |" in body
    assert ("rotary" in body) == export.arch["model.rope"]
    assert "AutoModelForCausalLM.from_pretrained(folder)" in body and "trust_remote_code" not in body.split("```")[1]


def test_the_model_cards_code_runs_and_continues_the_prompt_greedily(
    export: Export, capsys: pytest.CaptureFixture[str]
) -> None:
    card = (export.folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(export.folder))
    ours, _, _ = load_checkpoint(export.checkpoint)
    prompt = tiny_config().sample.prompt
    # generation_config.json's max_new_tokens: the sample stage's num_tokens (50) fit in the context here
    continuation = generate(ours, export.tokenizer.encode(prompt), 50, 1, GREEDY, seed=0)[0]
    expected = prompt + export.tokenizer.decode(continuation.tolist())

    exec(code, {})  # as a user pastes it

    assert capsys.readouterr().out == expected + "\n"


def test_generation_config_carries_the_sample_settings(export: Export) -> None:
    generation = transformers.GenerationConfig.from_pretrained(export.folder)
    sample = tiny_config().sample  # temperature 1.0, no top-k, no top-p

    assert generation.do_sample
    assert generation.temperature == sample.temperature
    assert generation.top_k in (0, None) and generation.top_p in (1.0, None)


# ---------------------------------------------------------------- what the export refuses


@dataclasses.dataclass(frozen=True)
class FutureModelConfig(ModelConfig):
    alibi: bool = True  # a future option that nobody mapped to a transformers class yet


def refused(model: GPT, tmp_path: Path) -> str:
    """The one-line message of the export's refusal; nothing written."""
    with pytest.raises(UserError) as info:
        export_hf(model, CharTokenizer("\n abc"), tiny_config().sample, "card", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_option_nobody_mapped_is_refused_by_name(tmp_path: Path) -> None:
    cfg = tiny_config(MODEL).model
    model = GPT(cfg, 5)
    model.cfg = FutureModelConfig(**dataclasses.asdict(cfg))

    assert "model.alibi (True) has no equivalent in a standard transformers class" in refused(model, tmp_path)


@pytest.mark.parametrize("rope", [True, False])
def test_qk_norm_is_refused_with_the_way_out(tmp_path: Path, rope: bool) -> None:
    model = GPT(tiny_config({**MODEL, "model.qk_norm": True, "model.rope": rope}).model, 5)

    message = refused(model, tmp_path)

    assert "model.qk_norm (True) has no equivalent in a standard transformers class" in message
    assert "`dvc exp run -S model.qk_norm=false`" in message


@pytest.mark.parametrize("rope", [True, False])
def test_a_parameter_without_an_equivalent_is_refused_by_name(tmp_path: Path, rope: bool) -> None:
    model = GPT(tiny_config({**MODEL, "model.rope": rope}).model, 5)
    model.blocks[0].attn.register_buffer("inv_freq", torch.ones(4))  # as another position scheme might add

    assert "parameter blocks.0.attn.inv_freq has no" in refused(model, tmp_path)


def test_an_unexpressible_checkpoint_exports_a_readme_that_says_why(tmp_path: Path) -> None:
    cfg = tiny_config({**MODEL, "model.qk_norm": True})
    save_checkpoint(tmp_path / "ckpt.pt", GPT(cfg.model, 5), CharTokenizer("\n abc"), 1, val_loss=1.0)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # an earlier export: replaced, not mixed in

    reason = export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "no-summary-needed.json", cfg, tmp_path / "hf")

    assert reason is not None and "model.qk_norm (True)" in reason
    assert os.listdir(tmp_path / "hf") == ["README.md"]
    assert reason in (tmp_path / "hf" / "README.md").read_text()


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint, GPT(tiny_config(MODEL).model, 5), CharTokenizer("\n abc"), 1, val_loss=1.0)
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])

    with pytest.raises(UserError, match="is corrupt or not a file this project wrote"):
        export_checkpoint(checkpoint, tmp_path / "train.json", tiny_config(MODEL), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_foreign_checkpoint_is_a_one_line_error_and_keeps_the_last_export(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "bad.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # an earlier export, which must survive
    env = {**tool_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    write_params(tmp_path / "params.yaml", TINY_PARAMS)
    args = ["--params", "params.yaml", "--checkpoint", "bad.pt", "--metrics", "train.json", "--output", "hf"]

    proc = subprocess.run(
        [sys.executable, "-m", "stages.export", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: checkpoint bad.pt is not a checkpoint of this project"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert os.listdir(tmp_path / "hf") == ["config.json"]


# ---------------------------------------------------------------- the export stage, driven by the real dvc CLI


def greedy_sample(project: Path, prompt: str, num_tokens: int) -> str:
    """The text of `python stages/sample.py --temperature 0` (fp32: no int8 weights), prompt included."""
    args = ["--prompt", prompt, "--num_tokens", str(num_tokens), "--temperature", "0", "--quantize", "none"]
    run_stage(project, "sample", *args, "--output", "greedy.txt")
    return (project / "greedy.txt").read_text(encoding="utf-8").removesuffix("\n")  # the file ends a sample so


@pytest.mark.slow
@pytest.mark.parametrize("rope", [False, True])
def test_dvc_repro_leaves_a_folder_that_continues_the_prompt_as_the_sample_stage(
    reproduced_project: Path, rope: bool
) -> None:
    """The tiny project's `dvc repro` (learned positions), and the defaults' rotary positions as an experiment."""
    project = reproduced_project
    if rope:
        assert "export" in ran_stages(dvc(project, "exp", "run", "-S", "model.rope=true"))
    folder = project / "out/hf"
    hf = load_hf(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("ROMEO:", return_tensors="pt")

    # generation_config.json: the sample stage writes 50 tokens, more than fit in the tiny project's context of 32,
    # so transformers (which does not slide the window) stops at 32 tokens, prompt included
    ids = hf.generate(**inputs, do_sample=False)

    assert type(hf).__name__ == ("Starcoder2ForCausalLM" if rope else "GPT2LMHeadModel")
    assert ids.shape[1] == 32
    assert tokenizer.decode(ids[0]) == greedy_sample(project, "ROMEO:", 32 - inputs["input_ids"].shape[1])


@pytest.mark.slow
def test_an_experiment_with_qk_norm_succeeds_and_says_why_there_is_no_model(reproduced_project: Path) -> None:
    project = reproduced_project

    result = dvc(project, "exp", "run", "-S", "model.qk_norm=true")

    log = output(result)
    assert {"train", "sample", "export"} <= ran_stages(result), log
    warnings = [line for line in log.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "model.qk_norm (True)" in warnings[0], log
    assert "Traceback" not in log, log
    assert os.listdir(project / "out/hf") == ["README.md"]
    readme = (project / "out/hf/README.md").read_text(encoding="utf-8")
    assert "model.qk_norm (True)" in readme and "dvc exp run -S model.qk_norm=false" in readme

    back = dvc(project, "exp", "run", "-S", "model.qk_norm=false")  # the committed run: all in the run cache

    assert {"train", "export"} <= restored_stages(back) and "export" not in ran_stages(back), output(back)
    assert (project / "out/hf/model.safetensors").is_file()
