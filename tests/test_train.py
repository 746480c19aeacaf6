"""The training loop's optional outputs: TensorBoard event files next to the DVC metrics, and its progress lines
off a terminal."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from nanogpt import files, progress
from nanogpt.config import load_config
from nanogpt.optim import lr_factor
from nanogpt.tokenizer import CharTokenizer, save_tokenizer, split_text
from nanogpt.train import TrainPaths, train

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = {
    "model.block_size": 16,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 16,
    "model.dropout": 0.0,
    "train.batch_size": 4,
    "train.max_iters": 6,
    "train.warmup_iters": 1,
    "train.eval_interval": 3,
    "train.device": "cpu",
    "train.compile": False,
    "train.dtype": "fp32",
    "train.resume_interval": 0,
}


def encoded_data(folder: Path) -> None:
    text = "to be, or not to be, that is the question:\n" * 40
    train_text, val_text = split_text(text, 0.2)
    tok = CharTokenizer.fit(train_text)
    files.torch_save(torch.tensor(tok.encode(train_text), dtype=torch.int32), folder / "train.pt")
    files.torch_save(torch.tensor(tok.encode(val_text), dtype=torch.int32), folder / "val.pt")
    save_tokenizer(tok, folder / "vocab.json")


def paths_under(folder: Path) -> TrainPaths:
    """The train stage's files under `folder`, laid out as in a project."""
    return TrainPaths(
        folder / "data", folder / "out/ckpt.pt", folder / "out/resume", folder / "metrics", folder / "out/tensorboard"
    )


def test_tensorboard_events_are_written_when_asked(tmp_path):
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    cfg = load_config(REPO_PARAMS, {**TINY, "train.tensorboard": True})

    summary = train(cfg, paths, show_progress=False)

    assert summary["steps"] == 6
    events = list((tmp_path / "out/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert (tmp_path / "metrics/train.json").exists()


def test_no_tensorboard_folder_by_default(tmp_path):
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    cfg = load_config(REPO_PARAMS, TINY)
    assert dataclasses.asdict(cfg.train)["tensorboard"] is False

    train(cfg, paths, show_progress=False)

    assert not (tmp_path / "out/tensorboard").exists()
    assert (tmp_path / "out/ckpt.pt").exists()


def test_the_logged_lr_is_the_one_the_optimizer_used(tmp_path):
    """train_loss.tsv's lr column is read from the optimizer's param group after each step (what set_lr wrote),
    so a loop that stops applying the schedule shows there."""
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    overrides = {**TINY, "train.max_iters": 8, "train.warmup_iters": 2, "train.min_lr": 0.1}
    cfg = load_config(REPO_PARAMS, {**overrides, "train.learning_rate": 2e-3})

    train(cfg, paths, show_progress=False)

    with open(tmp_path / "metrics/train_loss.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(row["step"]) for row in rows] == list(range(1, 9))  # row n is optimizer step n - 1
    logged = [float(row["lr"]) for row in rows]
    expected = [lr_factor(step, cfg.train) * 2e-3 for step in range(8)]
    # warmup, peak, cosine decay and its floor: the schedule reaches both ends
    assert expected[0] < expected[2] == pytest.approx(2e-3) and expected[-1] < 0.5 * 2e-3
    assert logged == pytest.approx(expected, rel=1e-5)  # the tsv keeps 6 significant digits


def run_tiny(folder: Path, overrides: dict) -> tuple[list[float], float]:
    """Train TINY plus `overrides` on the CPU in `folder`; the per-step train losses and the last val loss."""
    encoded_data(folder / "data")
    paths = TrainPaths(folder / "data", folder / "ckpt.pt", folder / "resume", folder / "metrics", folder / "tb")
    train(load_config(REPO_PARAMS, {**TINY, **overrides}), paths, show_progress=False)
    with open(folder / "metrics/train_loss.tsv", encoding="utf-8") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    with open(folder / "metrics/val_loss.tsv", encoding="utf-8") as f:
        val = [float(row["val_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    return losses, val[-1]


def test_bf16_autocast_trains_and_evaluates_close_to_fp32(tmp_path):
    """train.dtype bf16 on the CPU: the steps and the evaluation run under bf16 autocast. The losses are not
    fp32's (bf16 was in use) but within bf16's rounding of them: 8 bits of mantissa, about 0.4% relative per
    operation, which over 6 steps of a 1-layer model stays well inside 0.05 of a loss of about 3."""
    fp32_losses, fp32_val = run_tiny(tmp_path / "fp32", {"train.dtype": "fp32"})
    bf16_losses, bf16_val = run_tiny(tmp_path / "bf16", {"train.dtype": "bf16"})

    assert bf16_losses != fp32_losses and bf16_val != fp32_val
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.05)
    assert bf16_val == pytest.approx(fp32_val, abs=0.05)


@pytest.mark.slow
def test_compiled_train_step_gives_eager_losses(tmp_path, monkeypatch):
    """train.compile true on the CPU (torch.compile's C++ backend): the same steps as eager, up to the fused
    kernels' different summation order: 1e-4 on a loss of about 3 over 6 steps. Compiling the forward and
    backward took 108 s on a busy 2-core machine with a cold inductor cache (4 s warm), hence slow."""
    eager_losses, eager_val = run_tiny(tmp_path / "eager", {"train.compile": False})
    compiled_calls = []
    real_compile = torch.compile

    def recording_compile(*args, **kwargs):
        compiled_calls.append(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiled_losses, compiled_val = run_tiny(tmp_path / "compiled", {"train.compile": True})

    assert len(compiled_calls) == 1  # the step's forward was compiled, not run eagerly

    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert compiled_val == pytest.approx(eager_val, abs=1e-4)


def test_training_off_a_terminal_prints_step_lines_with_the_cpu_loss(tmp_path, capsys, monkeypatch):
    """The loop's wiring: with the interval at 0 every step prints its line, whose loss is the one the series logs."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    encoded_data(tmp_path / "data")
    cfg = load_config(REPO_PARAMS, TINY)

    train(cfg, paths_under(tmp_path), show_progress=True)

    out = capsys.readouterr().out.splitlines()
    step_lines = [line for line in out if "/6 (" in line]
    assert [line.split(":")[0] for line in step_lines] == [f"step {n}/6 ({100 * n // 6}%)" for n in range(1, 7)]
    train_losses = (tmp_path / "metrics/train_loss.tsv").read_text().splitlines()[1:]
    for line, row in zip(step_lines, train_losses, strict=True):
        loss = float(line.split("loss ")[1].split()[0])
        assert loss == pytest.approx(float(row.split()[1]), abs=1e-4)  # 4 decimals on the line, 6 digits in the TSV
        assert "tok/s  ETA 0:00:" in line
