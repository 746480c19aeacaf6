"""The Hugging Face export: transformers loads out/hf/ as a GPT2LMHeadModel that computes what this project's model
computes (logits, greedy text, tokens), for a char and a BPE checkpoint; anything it cannot represent is refused.

The checkpoints are tiny models trained for a few dozen steps here, with a context long enough (128) for transformers
to generate 100 tokens, which it does without sliding the window as this project's sampler does. One test runs the
export as a user does, `python -m stages.export` after `dvc repro` (it is a command, not a pipeline stage).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, TINY_PARAMS, git, make_corpus, run_stage, tiny_config, tool_env, write_params
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


class Export(NamedTuple):
    folder: Path  # the Hugging Face folder
    checkpoint: Path
    tokenizer: Tokenizer
    text: str  # the text the model was trained on


def train_tiny(tokenizer: Tokenizer, text: str, steps: int = 60) -> GPT:
    """A model that has learned a little (so its greedy text is not constant), in about a second."""
    torch.manual_seed(0)
    model = GPT(tiny_config(MODEL).model, tokenizer.vocab_size)
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


@pytest.fixture(scope="module", params=["char", "bpe"])
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Export:
    kind = request.param
    text = make_corpus(20_000).decode()
    tokenizer = CharTokenizer.fit(text) if kind == "char" else BpeTokenizer.fit(text, 300)
    folder = tmp_path_factory.mktemp(kind)
    checkpoint, summary = folder / "ckpt.pt", folder / "train.json"
    save_checkpoint(checkpoint, train_tiny(tokenizer, text), tokenizer, step=60, val_loss=VAL_LOSS)
    summary.write_text(json.dumps({"best_val_loss": VAL_LOSS, "best_val_bpc": VAL_BPC}))
    cfg = tiny_config({**MODEL, "encode.tokenizer": kind, "encode.vocab_size": 300})
    export_checkpoint(checkpoint, summary, cfg, folder / "hf")
    return Export(folder / "hf", checkpoint, tokenizer, text)


@pytest.mark.slow
def test_the_export_command_after_dvc_repro_writes_a_folder_transformers_loads(reproduced_project: Path) -> None:
    status = git(reproduced_project, "status", "--porcelain").stdout

    run_stage(reproduced_project, "export")  # python -m stages.export, every path its default

    hf = reproduced_project / "out/hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (hf / name).is_file(), name
    model = transformers.GPT2LMHeadModel.from_pretrained(hf)
    assert model.config.n_layer == 2  # conftest's tiny model
    # out/hf/ is not a DVC output: git ignores it (and the export's temporary folders), so the workspace stays clean
    assert git(reproduced_project, "status", "--porcelain").stdout == status


def test_transformers_gives_the_same_logits(export: Export) -> None:
    ours, _, _ = load_checkpoint(export.checkpoint)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export.folder).eval()
    data = torch.tensor(export.tokenizer.encode(export.text[-5000:]))
    windows = torch.stack([data[i : i + 128] for i in range(0, 400, 100)])  # (4, 128), full context

    with torch.no_grad():
        expected, _ = ours(windows)
        logits = hf(windows).logits

    assert hf.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_greedy_generate_gives_the_same_100_tokens(export: Export) -> None:
    ours, _, _ = load_checkpoint(export.checkpoint)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export.folder).eval()
    prompt = export.tokenizer.encode("ROMEO:\n")

    expected = generate(ours, prompt, 100, 1, SamplingParams(temperature=0.0, top_k=None, top_p=None), seed=0)
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=100)

    assert out[0, len(prompt) :].tolist() == expected[0].tolist()
    assert len(set(expected[0].tolist())) > 1  # the greedy path changes token at least once


def test_tokenizer_round_trips_the_prompt(export: Export) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(export.folder)

    ids = tokenizer(PROMPT)["input_ids"]

    assert ids == export.tokenizer.encode(PROMPT)
    assert tokenizer.decode(ids) == PROMPT


def test_config_ties_the_embeddings_and_uses_the_exact_gelu(export: Export) -> None:
    from safetensors import safe_open

    config = json.loads((export.folder / "config.json").read_text())
    hf = transformers.GPT2LMHeadModel.from_pretrained(export.folder)
    with safe_open(export.folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())

    assert config["activation_function"] == "gelu"  # erf GELU; "gelu_new" is GPT-2's tanh approximation
    assert config["tie_word_embeddings"] and config["scale_attn_weights"]
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # saved once
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_model_card_reports_the_checkpoints_scores(export: Export) -> None:
    card = (export.folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)

    assert metadata["library_name"] == "transformers"
    scores = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"loss": VAL_LOSS, "bits_per_character": VAL_BPC}
    for section in ("## Training data", "## Hyperparameters", "## Evaluation", "## How to use", "## Limitations"):
        assert section in body
    assert "| `model.n_layer` | 2 |" in body


def test_generation_config_carries_the_sample_settings(export: Export) -> None:
    generation = transformers.GenerationConfig.from_pretrained(export.folder)
    sample = tiny_config().sample  # temperature 1.0, no top-k, no top-p

    assert generation.do_sample
    assert generation.temperature == sample.temperature
    assert generation.top_k in (0, None) and generation.top_p in (1.0, None)


# ---------------------------------------------------------------- what the export refuses


@dataclasses.dataclass(frozen=True)
class FutureModelConfig(ModelConfig):
    alibi: bool = True  # a future option that nobody mapped to GPT-2 yet


def refused(model: GPT, tmp_path: Path) -> str:
    """The one-line message of the export's refusal; nothing written."""
    with pytest.raises(UserError) as info:
        export_hf(model, CharTokenizer("\n abc"), tiny_config().sample, "card", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    return str(info.value)


def test_an_option_without_a_gpt2_equivalent_is_refused_by_name(tmp_path: Path) -> None:
    cfg = tiny_config(MODEL).model
    model = GPT(cfg, 5)
    model.cfg = FutureModelConfig(**dataclasses.asdict(cfg))

    message = refused(model, tmp_path)

    assert "model.alibi" in message and "\n" not in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("rope", True), ("qk_norm", True), ("mlp", "relu2"), ("tie_embeddings", False)],
)
def test_an_architecture_option_away_from_gpt2_is_refused_by_name(tmp_path: Path, option, value) -> None:
    model = GPT(tiny_config({**MODEL, f"model.{option}": value}).model, 5)

    message = refused(model, tmp_path)

    assert f"model.{option} ({value!r}) has no GPT-2 equivalent" in message and "\n" not in message


def test_a_parameter_without_a_gpt2_equivalent_is_refused_by_name(tmp_path: Path) -> None:
    model = GPT(tiny_config(MODEL).model, 5)
    model.blocks[0].attn.register_buffer("inv_freq", torch.ones(4))  # as rotary embeddings would add

    message = refused(model, tmp_path)

    assert "blocks.0.attn.inv_freq" in message and "\n" not in message


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
