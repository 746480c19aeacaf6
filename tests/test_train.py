"""The training loop: TensorBoard event files next to the DVC metrics, its progress lines off a terminal, the
logged rate, bf16 and compiled steps against fp32 and eager, and on a GPU the reduce-overhead step (captured or
compiled) against the eager one."""

import contextlib
import csv
import dataclasses
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from nanogpt import data, progress, runtime
from nanogpt.checkpoint import load_checkpoint
from nanogpt.data import save_tokens
from nanogpt.distributed import DistInfo
from nanogpt.errors import UserError
from nanogpt.metrics import MetricsRecorder
from nanogpt.model import GPT
from nanogpt.optim import lr_factor
from nanogpt.tokenizer import CharTokenizer, save_tokenizer, split_text
from nanogpt.train import Interrupted, TrainPaths, train, train_warnings

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
    save_tokens(folder / "train.pt", torch.tensor(tok.encode(train_text), dtype=torch.int32), tok)
    save_tokens(folder / "val.pt", torch.tensor(tok.encode(val_text), dtype=torch.int32), tok)
    save_tokenizer(tok, folder / "vocab.json")


def paths_under(folder: Path) -> TrainPaths:
    """The train stage's files under `folder`, laid out as in a project."""
    return TrainPaths(
        folder / "data", folder / "out/ckpt.pt", folder / "out/resume", folder / "metrics", folder / "out/tensorboard"
    )


def test_tensorboard_events_are_written_when_asked(tmp_path):
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    cfg = tiny_config({**TINY, "train.tensorboard": True})

    summary = train(cfg, paths, show_progress=False)

    assert summary["steps"] == 6
    events = list((tmp_path / "out/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert (tmp_path / "metrics/train.json").exists()


def test_no_tensorboard_folder_by_default(tmp_path):
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    cfg = tiny_config(TINY)
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
    cfg = tiny_config({**overrides, "train.learning_rate": 2e-3})

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
    train(tiny_config({**TINY, **overrides}), paths, show_progress=False)
    with open(folder / "metrics/train_loss.tsv", encoding="utf-8") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    with open(folder / "metrics/val_loss.tsv", encoding="utf-8") as f:
        val = [float(row["val_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    return losses, val[-1]


def test_bf16_autocast_trains_and_evaluates_close_to_fp32(tmp_path):
    """train.dtype bf16 on the CPU: the steps and the evaluation run under bf16 autocast. The losses are within
    bf16's rounding of fp32's: 8 bits of mantissa, about 0.4% relative per operation, which over 6 steps of a
    1-layer model stays well inside 0.05 of a loss of about 3. That bf16 was in use: the first step's loss, from the
    same weights in both runs, differs (by about 3e-5 of it); and the best checkpoint's val loss is what its
    weights give under bf16 autocast, not in fp32 (which differs by about 2e-5 of it). The files' 6 digits cannot
    show the evaluation's part: there the two runs' last val losses can coincide (they did on one GPU machine's CPU).
    """
    fp32_losses, fp32_val = run_tiny(tmp_path / "fp32", {"train.dtype": "fp32", "train.eval_iters": None})
    bf16_losses, bf16_val = run_tiny(tmp_path / "bf16", {"train.dtype": "bf16", "train.eval_iters": None})

    assert bf16_losses[0] != fp32_losses[0]
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.05)
    assert bf16_val == pytest.approx(fp32_val, abs=0.05)
    model, tokenizer, info = load_checkpoint(tmp_path / "bf16/ckpt.pt")
    val = data.load_tokens(tmp_path / "bf16/data/val.pt", tokenizer, tmp_path / "bf16/data/vocab.json")
    evalset = data.eval_windows(val, model.cfg.block_size)

    def evaluated(autocast: contextlib.AbstractContextManager) -> float:
        total, count = data.evaluate(model, evalset, TINY["train.batch_size"], autocast, None, 0, 1)
        return float(total / count)

    assert evaluated(runtime.autocast(torch.device("cpu"), torch.bfloat16)) == pytest.approx(info["val_loss"], rel=1e-9)
    assert evaluated(contextlib.nullcontext()) != pytest.approx(info["val_loss"], rel=1e-9)


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


def test_with_ema_the_checkpoint_holds_the_average_that_was_evaluated(tmp_path):
    """train.ema: evaluation and the best checkpoint use the moving average of the weights, not the last
    weights; the checkpoint's val loss is that of its own weights."""
    folder = tmp_path / "ema"
    encoded_data(folder / "data")
    paths = TrainPaths(folder / "data", folder / "ckpt.pt", folder / "resume", folder / "metrics", folder / "tb")
    cfg = tiny_config({**TINY, "train.ema": 0.5, "train.eval_interval": 6, "train.eval_iters": None})
    plain = tmp_path / "plain"
    run_tiny(plain, {"train.eval_interval": 6})

    summary = train(cfg, paths, show_progress=False)

    model, _, info = load_checkpoint(paths.checkpoint)
    last, _, _ = load_checkpoint(plain / "ckpt.pt")  # the same run without the average: its last weights
    assert info["step"] == 6 == summary["best_step"]
    assert not torch.equal(model.wte.weight, last.wte.weight)
    _, tokenizer, _ = load_checkpoint(paths.checkpoint)
    val = data.load_tokens(folder / "data/val.pt", tokenizer, folder / "data/vocab.json")
    evalset = data.eval_windows(val, cfg.model.block_size)
    total, count = data.evaluate(model, evalset, cfg.train.batch_size, contextlib.nullcontext(), None, 0, 1)
    assert float(total / count) == pytest.approx(info["val_loss"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "compile", "compiled_as", "tolerance"),
    [
        ("fp32", False, [], 1e-4),  # the whole step captured as one CUDA graph, nothing compiled
        ("fp32", "auto", ["default"], 1e-4),  # the GPU default: captured, the forward compiled inside it (without
        # graphs of its own)
        ("bf16", True, ["default"], 2e-3),
        ("fp16", True, ["reduce-overhead"], 2e-3),  # the grad scaler: not captured, torch.compile's CUDA graphs
    ],
    ids=["fp32-captured", "fp32-captured-compiled-auto", "bf16-captured-compiled", "fp16-compiled"],
)
def test_reduce_overhead_training_gives_eager_losses(tmp_path, monkeypatch, dtype, compile, compiled_as, tolerance):
    """train.compile_mode reduce-overhead on one GPU against the eager step (compile_mode default, no compile),
    same seed and dtype, 6 steps (a captured step replays from the third). fp32: the same losses up to the
    summation order of fused kernels and the capturable AdamW's bias correction on the device (1e-4, as on the
    CPU). bf16 and fp16: compiled code keeps fused intermediates in fp32 where eager rounds them to 16 bits; on the
    CPU this run's bf16 losses are within 1e-4 of fp32's, and 2e-3 is 20 times that, while the loss falls by
    0.02 a step, so a step that trained on stale weights, batches or rates shows."""
    on_gpu = {"train.device": "cuda", "train.dtype": dtype}
    eager_losses, eager_val = run_tiny(tmp_path / "eager", {**on_gpu, "train.compile_mode": "default"})
    torch.compiler.reset()  # this run compiles (and captures) its own code, not an earlier test's
    modes = []
    real_compile = torch.compile

    def recording_compile(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    overrides = {**on_gpu, "train.compile": compile, "train.compile_mode": "reduce-overhead"}
    losses, val = run_tiny(tmp_path / "reduce-overhead", overrides)

    assert modes == compiled_as
    assert losses == pytest.approx(eager_losses, abs=tolerance)
    assert val == pytest.approx(eager_val, abs=tolerance)


def test_training_off_a_terminal_prints_step_lines_with_the_cpu_loss(tmp_path, capsys, monkeypatch):
    """The loop's wiring: with the interval at 0 every step prints its line, whose loss is the one the series logs."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    encoded_data(tmp_path / "data")
    cfg = tiny_config(TINY)

    train(cfg, paths_under(tmp_path), show_progress=True)

    out = capsys.readouterr().out.splitlines()
    step_lines = [line for line in out if "/6 (" in line]
    assert [line.split(":")[0] for line in step_lines] == [f"step {n}/6 ({100 * n // 6}%)" for n in range(1, 7)]
    train_losses = (tmp_path / "metrics/train_loss.tsv").read_text().splitlines()[1:]
    for line, row in zip(step_lines, train_losses, strict=True):
        loss = float(line.split("loss ")[1].split()[0])
        assert loss == pytest.approx(float(row.split()[1]), abs=1e-4)  # 4 decimals on the line, 6 digits in the TSV
        assert "tok/s  ETA 0:00:" in line


def test_a_cpu_summary_has_no_peak_memory_key_rather_than_none(tmp_path):
    """peak_memory_mib is the GPU memory torch allocated: off CUDA the key is left out, never written as null."""
    encoded_data(tmp_path / "data")

    summary = train(tiny_config(TINY), paths_under(tmp_path), show_progress=False)

    assert "peak_memory_mib" not in summary and None not in summary.values()
    assert json.loads((tmp_path / "metrics/train.json").read_text()).keys() == summary.keys()


@pytest.mark.parametrize(
    ("dtype", "warned"),
    [
        (torch.bfloat16, "bf16 on the CPU: many times slower"),
        (torch.float16, "fp16 on the CPU: slower"),
        (torch.float32, None),
    ],
)
def test_half_precision_on_the_cpu_is_warned_about(dtype, warned):
    """Half precision on a CPU is slower than fp32 (bf16 autocast many times): one line says so before the run."""
    warnings = [w for w in train_warnings(tiny_config(TINY).train, torch.device("cpu"), dtype) if "on the CPU" in w]

    assert warnings == (
        [f"train.dtype is {warned} than fp32 on most CPUs, and less precise; use auto (fp32 here)"] if warned else []
    )


def test_a_resumed_run_says_how_long_this_launch_took_to_start(tmp_path, capsys, monkeypatch):
    """`ready N s after launch` counts this process's start-up, not the time of the runs it resumes (which the
    series' elapsed_s continue)."""
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    cfg = tiny_config({**TINY, "train.resume_interval": 3})
    forward, calls = GPT.forward, []

    def interrupt_at_step_4(self, *args, **kwargs):
        calls.append(self.training)
        if calls.count(True) == 4:
            signal.raise_signal(signal.SIGINT)  # the loop stops before step 5, saving the state at step 4
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", interrupt_at_step_4)
    with pytest.raises(Interrupted):
        train(cfg, paths, show_progress=False)
    monkeypatch.undo()
    [state_path] = paths.resume_dir.glob("*/state.pt")
    state = torch.load(state_path, weights_only=True)
    state["elapsed"] = 1e6  # the interrupted run had trained for 11 days
    torch.save(state, state_path)
    capsys.readouterr()

    train(cfg, paths, show_progress=True)

    out = capsys.readouterr().out
    assert "resuming from step 4 " in out, out
    ready = float(re.search(r"ready ([\d.]+) s after launch", out)[1])
    assert ready < 1e5
    with open(tmp_path / "metrics/val_loss.tsv", encoding="utf-8") as f:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f, delimiter="\t")]
    assert elapsed[0] < 1e5 and elapsed[1] >= 1e6  # step 3 before the interruption, step 6 after it


def test_an_evaluation_during_the_steps_that_compile_shows_no_speed(tmp_path, capsys):
    """Its interval holds the compilation, so a rate would mislead; the first evaluation after them shows one."""
    cfg = tiny_config(TINY).train
    recorder = MetricsRecorder(cfg, tmp_path, tmp_path, 100, torch.device("cpu"), DistInfo(), False, True)
    recorder.start(0, compile_steps=2)
    for step in (1, 2, 3):
        recorder.record_step(step, torch.tensor(2.0), torch.tensor(1.0), 1e-3)
        recorder.flush()
        recorder.evaluation(step, 2.5, 3.0)

    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.rsplit("  ", 1)[1] for line in out][:2] == ["compiling", "compiling"]
    assert out[2].endswith(" tok/s")


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """out/ on a 16 KiB tmpfs holding an earlier checkpoint: the first save fails as `cannot write PATH: REASON`
    (not torch.save's chained RuntimeError) and the earlier checkpoint stays."""
    encoded_data(tmp_path / "data")
    paths = paths_under(tmp_path)
    paths.checkpoint.parent.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(paths.checkpoint.parent)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        paths.checkpoint.write_bytes(b"an earlier checkpoint")
        with pytest.raises(UserError) as info:
            train(tiny_config(TINY), paths, show_progress=False)
        assert str(info.value) == f"cannot write {paths.checkpoint}: No space left on device"
        assert info.value.__suppress_context__
        assert paths.checkpoint.read_bytes() == b"an earlier checkpoint"
    finally:
        subprocess.run(["umount", str(paths.checkpoint.parent)], check=True)
