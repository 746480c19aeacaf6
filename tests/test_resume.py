"""The train stage's promises about interruption, resume, atomic saves and non-finite losses.

Each test drives `python -m stages.train` (or `dvc repro`) as a subprocess in a temporary copy of the
project with a tiny CPU model, the way a user would: signals, reruns, changed params, a blow-up.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import (
    TINY_PARAMS,
    commit,
    copy_project,
    dvc,
    make_corpus,
    make_project,
    read_params,
    run_stage,
    set_params,
    snapshot,
    tool_env,
)

# Dropout on, so restoring the RNG state matters for exactness; 60 steps: evaluation and resume state every 10.
OVERRIDES = {"model.dropout": 0.1, "train.max_iters": 60}
MAX_ITERS = OVERRIDES["train.max_iters"]
EVAL_INTERVAL = TINY_PARAMS["train.eval_interval"]
STEP_LINE = re.compile(r"^step (\d+):")
RESUMING = re.compile(r"^resuming from step (\d+) ", re.MULTILINE)
TIMING_KEYS = ("tokens_per_sec", "wall_time_s")
KEY_FOLDER = re.compile(r"out/resume/[0-9a-f]{16}/")  # a run's resume state: out/resume/<its resume key>/


# ---------------------------------------------------------------- helpers


def resume_states(project: Path) -> list[Path]:
    """The state.pt files under out/resume/, one per interrupted run."""
    return sorted((project / "out" / "resume").glob("*/state.pt"))


# Run in a child: the train stage, sending itself `sig` during the forward pass of optimizer step `at_step`
# (1-based). A signal from inside lands at an exact step, where one sent after reading the log lands
# wherever the child happens to be (usually in the resume-state save right after an evaluation).
SIGNAL_AT_STEP = """
import os, runpy, signal, sys
import nanogpt.model

sig, at_step = signal.Signals[sys.argv[1]], int(sys.argv[2])
forward = nanogpt.model.GPT.forward
calls = 0

def forward_then_signal(self, *args, **kwargs):
    global calls
    if self.training:
        calls += 1
        if calls == at_step:
            os.kill(os.getpid(), sig)
    return forward(self, *args, **kwargs)

nanogpt.model.GPT.forward = forward_then_signal
sys.argv = ["stages/train.py"]
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
"""


def run_script(project: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c script args...` in `project`, as the stages run there; its exit code checked by the caller."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def signal_at_step(project: Path, sig: signal.Signals, at_step: int) -> subprocess.CompletedProcess:
    return run_script(project, SIGNAL_AT_STEP, sig.name, str(at_step))


@dataclass
class Stopped:
    returncode: int
    stdout: str
    stderr: str


def stop_after_log_step(project: Path, sig: int, after_step: int, cmd: list[str]) -> Stopped:
    """Run `cmd` and send `sig` to its process group as soon as the log shows step `after_step` or later
    (as Ctrl-C in a terminal or a CI job's cancel would); wait for it to end."""
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=tool_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            match = STEP_LINE.match(line)
            if match and int(match[1]) >= after_step:
                with contextlib.suppress(ProcessLookupError):  # it may have ended already
                    os.killpg(proc.pid, sig)
                break
        rest, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout = "".join(seen) + rest
    if not any((m := STEP_LINE.match(line)) and int(m[1]) >= after_step for line in seen):
        pytest.fail(f"training ended before step {after_step} (exit {proc.returncode})\n{stdout}\n{err}")
    return Stopped(proc.returncode, stdout, err)


@dataclass
class Result:
    """What an uninterrupted run and a resumed one must agree on."""

    weights: dict[str, torch.Tensor]
    checkpoint_step: int
    summary: dict[str, Any]
    train_series: list[str]  # metrics/train_loss.tsv lines: step, train_loss, lr
    val_series: list[list[str]]  # metrics/val_loss.tsv rows without elapsed_s (wall-clock time)


def read_result(project: Path) -> Result:
    ckpt = torch.load(project / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    summary = json.loads((project / "metrics" / "train.json").read_text())
    for key in TIMING_KEYS:
        summary.pop(key)
    val_lines = (project / "metrics" / "val_loss.tsv").read_text().splitlines()
    header = val_lines[0].split("\t")
    keep = [i for i, name in enumerate(header) if name != "elapsed_s"]
    return Result(
        ckpt["model"],
        ckpt["step"],
        summary,
        (project / "metrics" / "train_loss.tsv").read_text().splitlines(),
        [[row.split("\t")[i] for i in keep] for row in val_lines],
    )


def assert_same_result(got: Result, want: Result) -> None:
    steps = [int(line.split("\t")[0]) for line in got.train_series[1:]]
    assert steps == list(range(1, MAX_ITERS + 1)), f"train_loss.tsv has steps {steps}"
    val_steps = [int(row[0]) for row in got.val_series[1:]]
    assert val_steps == list(range(EVAL_INTERVAL, MAX_ITERS + 1, EVAL_INTERVAL)), f"val_loss.tsv has steps {val_steps}"
    assert got.weights.keys() == want.weights.keys()
    differing = [name for name, tensor in want.weights.items() if not torch.equal(got.weights[name], tensor)]
    assert not differing, f"weights differ from the uninterrupted run: {differing}"
    assert got.checkpoint_step == want.checkpoint_step
    assert got.summary == want.summary
    assert got.train_series == want.train_series
    assert got.val_series == want.val_series


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def encoded_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with data/ encoded; copy it, don't change it."""
    project = make_project(
        tmp_path_factory.mktemp("encoded") / "project", overrides=OVERRIDES, corpus=make_corpus(size=30_000)
    )
    run_stage(project, "encode")
    return project


@pytest.fixture(scope="module")
def trained_project(encoded_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The encoded project after one uninterrupted training run; copy it, don't change it."""
    project = copy_project(encoded_project, tmp_path_factory.mktemp("trained") / "project")
    run_stage(project, "train")
    return project


@pytest.fixture(scope="module")
def reference(trained_project: Path) -> Result:
    return read_result(trained_project)


@pytest.fixture
def fresh_project(encoded_project: Path, tmp_path: Path) -> Path:
    return copy_project(encoded_project, tmp_path / "project")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Seeded per test, so the (random) kill points are the same on every run."""
    return random.Random(request.node.nodeid)


# ---------------------------------------------------------------- kill and resume


def test_uninterrupted_run_leaves_no_resume_state(trained_project: Path, reference: Result) -> None:
    assert not (trained_project / "out" / "resume").exists()
    assert reference.summary["steps"] == MAX_ITERS
    assert not [p.name for p in (trained_project / "out").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_kill_and_resume_matches_uninterrupted_run(
    fresh_project: Path, reference: Result, rng: random.Random, sig: signal.Signals
) -> None:
    # a seeded random step between two evaluations, past the first resume-state save
    at_step = rng.choice([k for k in range(EVAL_INTERVAL + 2, MAX_ITERS) if k % EVAL_INTERVAL])
    stopped = signal_at_step(fresh_project, sig, at_step)

    if sig == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
        saved_at = (at_step - 1) // EVAL_INTERVAL * EVAL_INTERVAL  # the last resume_interval save
    else:
        assert stopped.returncode == 128 + sig, stopped.stderr
        assert stopped.stderr.splitlines() == [
            f"interrupted by {sig.name} at step {at_step}; resume state saved: run the same command again to continue"
        ]
        saved_at = at_step
    assert len(resume_states(fresh_project)) == 1

    resumed = run_stage(fresh_project, "train")
    resuming = re.compile(rf"^resuming from step {saved_at} \({KEY_FOLDER.pattern}state\.pt\)$", re.MULTILINE)
    assert resuming.search(resumed.stdout), resumed.stdout
    assert_same_result(read_result(fresh_project), reference)
    assert not (fresh_project / "out" / "resume").exists()


# the architecture and training options, all on: the weight average and the options' buffers must come back exactly too
EVERY_OPTION = {
    "model.rope": True,
    "model.qk_norm": True,
    "model.mlp": "relu2",
    "model.tie_embeddings": False,
    "train.schedule": "wsd",
    "train.cooldown": 0.5,
    "train.ema": 0.9,
}


@pytest.mark.slow
def test_resume_with_every_option_on_matches_uninterrupted_run(encoded_project: Path, tmp_path: Path) -> None:
    uninterrupted = copy_project(encoded_project, tmp_path / "uninterrupted")
    set_params(uninterrupted / "params.yaml", EVERY_OPTION)
    run_stage(uninterrupted, "train")
    project = copy_project(encoded_project, tmp_path / "project")
    set_params(project / "params.yaml", EVERY_OPTION)

    stopped = signal_at_step(project, signal.SIGINT, 2 * EVAL_INTERVAL + 3)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    run_stage(project, "train")

    assert_same_result(read_result(project), read_result(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_dvc_repro_resumes_after_signal(
    encoded_project: Path, reference: Result, tmp_path: Path, sig: signal.Signals
) -> None:
    """A CI job cancelled (SIGTERM) or Ctrl-C (SIGINT) in a terminal: the signal goes to dvc and the stage."""
    project = copy_project(encoded_project, tmp_path / "project")
    corpus = tmp_path / "corpus.txt"
    shutil.move(project / "data" / "input.txt", corpus)
    for name in ("train.pt", "val.pt", "vocab.json"):
        (project / "data" / name).unlink()
    set_params(
        project / "params.yaml",
        {
            "data.url": corpus.as_uri(),
            "data.retries": 0,
            "data.sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        },
    )
    commit(project, "tiny project")

    stopped = stop_after_log_step(project, sig, after_step=20, cmd=[sys.executable, "-m", "dvc", "repro"])
    assert stopped.returncode != 0
    assert f"interrupted by {sig.name}" in stopped.stderr, stopped.stdout + stopped.stderr
    assert len(resume_states(project)) == 1

    rerun = dvc(project, "repro", check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    start = RESUMING.search(rerun.stdout)
    assert start and int(start[1]) >= 20, rerun.stdout
    assert_same_result(read_result(project), reference)
    assert not (project / "out" / "resume").exists()


@pytest.mark.slow
def test_an_interrupted_experiment_resumes_after_another_ran_to_the_end(encoded_project: Path, tmp_path: Path) -> None:
    """`dvc exp run -S train.seed=11` stopped by SIGTERM, another experiment run to the end, then seed 11 again: it
    resumes where it stopped and ends as an uninterrupted seed-11 run does."""
    uninterrupted = copy_project(encoded_project, tmp_path / "uninterrupted")
    set_params(uninterrupted / "params.yaml", {"train.seed": 11})
    run_stage(uninterrupted, "train")
    project = copy_project(encoded_project, tmp_path / "project")
    corpus = tmp_path / "corpus.txt"
    shutil.move(project / "data" / "input.txt", corpus)
    for name in ("train.pt", "val.pt", "vocab.json"):
        (project / "data" / name).unlink()
    sha256 = hashlib.sha256(corpus.read_bytes()).hexdigest()
    set_params(project / "params.yaml", {"data.url": corpus.as_uri(), "data.retries": 0, "data.sha256": sha256})
    commit(project, "tiny project")
    seed_11 = [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.seed=11"]

    stopped = stop_after_log_step(project, signal.SIGTERM, after_step=20, cmd=seed_11)
    assert "interrupted by SIGTERM" in stopped.stderr, stopped.stdout + stopped.stderr
    other = dvc(project, "exp", "run", "-S", "train.seed=12")
    assert "resume state was made with other params" in other.stdout, other.stdout
    assert len(resume_states(project)) == 1  # seed 11's, still waiting
    rerun = dvc(project, *seed_11[3:])

    start = RESUMING.search(rerun.stdout)
    assert start and int(start[1]) >= 20, rerun.stdout
    assert_same_result(read_result(project), read_result(uninterrupted))
    assert not (project / "out" / "resume").exists()


# ---------------------------------------------------------------- stale state


@pytest.fixture(scope="module")
def interrupted_project(encoded_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The encoded project stopped by SIGINT at step 25, its resume state saved; copy it."""
    project = copy_project(encoded_project, tmp_path_factory.mktemp("interrupted") / "project")
    stopped = signal_at_step(project, signal.SIGINT, at_step=2 * EVAL_INTERVAL + 5)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    return project


def _bump_resume_format(project: Path) -> None:
    path = project / "nanogpt" / "checkpoint.py"
    text, n = re.subn(
        r"^RESUME_FORMAT = (\d+)", lambda m: f"RESUME_FORMAT = {int(m[1]) + 1}", path.read_text(), flags=re.MULTILINE
    )
    assert n == 1
    path.write_text(text)


def _truncate_state(project: Path) -> None:
    [state] = resume_states(project)
    state.write_bytes(state.read_bytes()[:1000])


STALE = {
    "other code version": (_bump_resume_format, "resume state was made with other params, data or code"),
    "truncated state": (_truncate_state, f"resume state {KEY_FOLDER.pattern}state.pt is corrupt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", STALE)
def test_unusable_resume_state_is_not_mixed_in(
    interrupted_project: Path, reference: Result, tmp_path: Path, change: str
) -> None:
    project = copy_project(interrupted_project, tmp_path / "project")
    apply, why = STALE[change]
    apply(project)
    rerun = run_stage(project, "train")
    lines = [line for line in rerun.stdout.splitlines() if "starting from step 0" in line]
    assert len(lines) == 1 and re.search(why, lines[0]), rerun.stdout
    assert not RESUMING.search(rerun.stdout)
    # started from scratch with the same params, so it ends exactly where an uninterrupted run does
    assert_same_result(read_result(project), reference)


@pytest.mark.slow
def test_resume_state_from_other_params_is_not_mixed_in(interrupted_project: Path, tmp_path: Path) -> None:
    params = read_params(interrupted_project / "params.yaml")
    changed = {"train.learning_rate": 2 * float(params["train"]["learning_rate"])}
    project = copy_project(interrupted_project, tmp_path / "project")
    set_params(project / "params.yaml", changed)
    rerun = run_stage(project, "train")
    assert "resume state was made with other params, data or code: starting from step 0" in rerun.stdout
    assert not RESUMING.search(rerun.stdout)

    fresh = copy_project(interrupted_project, tmp_path / "fresh")
    shutil.rmtree(fresh / "out" / "resume")
    set_params(fresh / "params.yaml", changed)
    run_stage(fresh, "train")
    assert_same_result(read_result(project), read_result(fresh))


@pytest.mark.slow
def test_checkpoint_from_other_params_is_not_restored(interrupted_project: Path, tmp_path: Path) -> None:
    """`dvc repro` deletes out/ckpt.pt before each run; a resumed run must not put back one from other params."""
    project = copy_project(interrupted_project, tmp_path / "project")
    params = read_params(project / "params.yaml")
    set_params(project / "params.yaml", {"train.learning_rate": 2 * float(params["train"]["learning_rate"])})
    for _ in range(2):  # stop the new run twice before its first evaluation writes a checkpoint
        (project / "out" / "ckpt.pt").unlink(missing_ok=True)
        stopped = signal_at_step(project, signal.SIGINT, at_step=3)
        assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    assert "resuming from step 3 " in stopped.stdout
    assert not (project / "out" / "ckpt.pt").exists()


# ---------------------------------------------------------------- atomic saves


def _failing_save(fail_after: int):
    """A torch.save that writes the first `fail_after` bytes of the real file, then fails like a full disk."""
    real_save = torch.save

    def save(obj: Any, f: Any) -> None:
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:fail_after])
        f.flush()
        raise OSError(28, "No space left on device")

    return save


def test_failed_checkpoint_save_keeps_previous_checkpoint(
    trained_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanogpt.checkpoint import load_checkpoint, save_checkpoint

    out = copy_project(trained_project, tmp_path / "project") / "out"
    before = (out / "ckpt.pt").read_bytes()
    model, tokenizer, meta = load_checkpoint(out / "ckpt.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    monkeypatch.setattr(torch, "save", _failing_save(fail_after=len(before) // 2))
    with pytest.raises(OSError):
        save_checkpoint(out / "ckpt.pt", model, tokenizer, step=meta["step"] + 1, val_loss=0.0)
    monkeypatch.undo()

    assert (out / "ckpt.pt").read_bytes() == before
    assert load_checkpoint(out / "ckpt.pt")[2] == meta
    assert sorted(p.name for p in out.iterdir()) == [".gitignore", "ckpt.pt"]


# Run in a child: save a changed checkpoint over out/ckpt.pt, but stop half-way through the bytes and wait
# to be killed, as a power cut or the OOM killer would stop it.
KILLED_MID_SAVE = """
import io, sys, time
import torch
from nanogpt.checkpoint import load_checkpoint, save_checkpoint

real_save = torch.save
def save_half_then_hang(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(600)

model, tokenizer, meta = load_checkpoint("out/ckpt.pt")
torch.save = save_half_then_hang  # files.torch_save imports torch when it saves
save_checkpoint("out/ckpt.pt", model, tokenizer, meta["step"] + 1, 0.0)
"""


def test_checkpoint_killed_mid_save_keeps_previous_checkpoint(trained_project: Path, tmp_path: Path) -> None:
    from nanogpt.checkpoint import load_checkpoint

    project = copy_project(trained_project, tmp_path / "project")
    before = (project / "out" / "ckpt.pt").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_SAVE],
        cwd=project,
        env=tool_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "half written\n", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    assert (project / "out" / "ckpt.pt").read_bytes() == before
    _, _, meta = load_checkpoint(project / "out" / "ckpt.pt")
    assert meta["step"] == torch.load(project / "out" / "ckpt.pt", weights_only=True)["step"]
    # the half-written bytes may stay behind, but only under a temporary name
    leftovers = [p.name for p in (project / "out").iterdir() if p.name not in (".gitignore", "ckpt.pt")]
    assert all(name.startswith(".ckpt.pt.") and name.endswith(".tmp") for name in leftovers), leftovers


# Run in a child: a stage, recording every path opened for writing and every rename, to writes.json.
WRITES_RECORDED = """
import builtins, io, json, os, runpy, sys

writes, renames = [], []
real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

def recording_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        writes.append(os.fspath(file))
    return real_open(file, mode, *args, **kwargs)

def recording_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        writes.append(os.fspath(path))
    return real_os_open(path, flags, *args, **kwargs)

def recording_replace(src, dst, *args, **kwargs):
    renames.append([os.fspath(src), os.fspath(dst)])
    return real_replace(src, dst, *args, **kwargs)

def dump():
    with real_open("writes.json", "w") as f:
        json.dump({"writes": writes, "renames": renames}, f)

def dump_then_exit(code, real_exit=os._exit):  # a stage ends its process with os._exit once its outputs are written
    dump()
    real_exit(code)

builtins.open = io.open = recording_open
os.open, os.replace, os._exit = recording_os_open, recording_replace, dump_then_exit
stage, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
finally:
    dump()
"""

ATOMIC_OUTPUTS = {
    "validate": ["out/params.ok"],
    "download": ["data/input.txt"],
    "encode": ["data/train.pt", "data/val.pt", "data/vocab.json"],
    "train": [
        "out/ckpt.pt",
        "out/resume/state.pt",
        "metrics/train.json",
        "metrics/train_loss.tsv",
        "metrics/val_loss.tsv",
    ],
    "sample": ["out/samples.txt", "metrics/sample.json"],
}


@pytest.mark.parametrize("stage", ATOMIC_OUTPUTS)
def test_outputs_are_written_to_a_temporary_file_and_renamed(
    interrupted_project: Path, tmp_path: Path, stage: str
) -> None:
    # the interrupted project: the train stage resumes, so restoring the checkpoint is covered too
    project = copy_project(interrupted_project, tmp_path / "project")
    corpus = Path(shutil.copy(project / "data" / "input.txt", tmp_path / "corpus.txt"))
    set_params(
        project / "params.yaml",
        {"data.url": corpus.as_uri(), "data.sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()},
    )
    args = ["--output", "out/samples.txt", "--metrics", "metrics/sample.json"] if stage == "sample" else []
    proc = run_script(project, WRITES_RECORDED, stage, *args)
    assert proc.returncode == 0, proc.stderr

    record = json.loads((project / "writes.json").read_text())

    def relative(path: str) -> str:  # out/resume/<key>/x as out/resume/x: one run's key folder
        path = os.path.relpath(path, project) if os.path.isabs(path) else os.path.normpath(path)
        return KEY_FOLDER.sub("out/resume/", path)

    def ours(path: str) -> bool:  # a file of the project's, not of a library's cache (Triton's kernels, on a GPU)
        return path.split(os.sep, maxsplit=1)[0] in ("data", "out", "metrics")

    written = {p for p in map(relative, record["writes"]) if ours(p)}
    assert written, "no writes recorded"
    renamed = {}
    for renamed_from, renamed_to in record["renames"]:
        src, dst = relative(renamed_from), relative(renamed_to)
        if not (ours(src) or ours(dst)):
            continue
        assert os.path.dirname(src) == os.path.dirname(dst), f"{src} renamed across folders to {dst}"
        renamed[dst] = src
    opened_in_place = sorted(written & set(renamed)) + sorted(p for p in written if p in ATOMIC_OUTPUTS[stage])
    assert not opened_in_place, f"written in place, not renamed into place: {opened_in_place}"
    assert set(ATOMIC_OUTPUTS[stage]) <= set(renamed), f"renamed into place: {sorted(renamed)}"
    assert all(renamed[dst] in written or dst == "out/resume/best.pt" for dst in renamed)


# ---------------------------------------------------------------- non-finite loss

NON_FINITE = re.compile(r"^error: loss or gradient became non-finite at step (\d+); training stopped, (.*)$")


def test_exploding_learning_rate_stops_and_keeps_existing_checkpoint(trained_project: Path, tmp_path: Path) -> None:
    project = copy_project(trained_project, tmp_path / "project")
    set_params(project / "params.yaml", {"train.learning_rate": 1e6, "train.grad_clip": 0.0})
    before = snapshot(project, folders=("out", "metrics"))

    proc = run_stage(project, "train", check=False)

    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    match = NON_FINITE.match(proc.stderr.strip())
    assert match, proc.stderr
    assert 1 <= int(match[1]) < EVAL_INTERVAL  # it blows up before this run's first evaluation
    assert "no checkpoint was written" in match[2]
    # checkpoint, metrics: byte-identical; no resume state saved
    assert snapshot(project, folders=("out", "metrics")) == before


# Run in a child: the train stage, with the training loss turned to NaN at one optimizer step and a copy of
# every checkpoint kept as it was written, so the test can compare the bytes afterwards.
NAN_AT_STEP = """
import runpy, shutil, sys
from pathlib import Path
import nanogpt.model, nanogpt.train

bad_step, what = int(sys.argv[1]), sys.argv[2]
forward, save = nanogpt.model.GPT.forward, nanogpt.train.write_checkpoint
calls = 0

def poisoned_forward(self, *args, **kwargs):
    global calls
    logits, loss = forward(self, *args, **kwargs)
    if self.training and loss is not None:
        calls += 1
        if calls == bad_step and what == "loss":
            loss = loss * float("nan")
        elif calls == bad_step:  # a finite loss whose gradients are not
            loss.register_hook(lambda grad: grad * float("inf"))
    return logits, loss

def recorded_save(ckpt, path):  # on the training loop's writer thread
    save(ckpt, path)
    shutil.copyfile(path, Path("written") / f"ckpt-{ckpt['step']}.pt")

nanogpt.model.GPT.forward = poisoned_forward
nanogpt.train.write_checkpoint = recorded_save
Path("written").mkdir()
sys.argv = ["stages/train.py"]
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_value_names_step_and_keeps_last_good_checkpoint(fresh_project: Path, what: str) -> None:
    bad_step = 2 * EVAL_INTERVAL + 3
    proc = run_script(fresh_project, NAN_AT_STEP, str(bad_step), what)

    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    match = NON_FINITE.match(proc.stderr.strip())
    assert match, proc.stderr
    assert int(match[1]) == bad_step
    written = sorted(int(p.stem.split("-")[1]) for p in (fresh_project / "written").iterdir())
    assert written and max(written) < bad_step
    last_good = max(written)
    assert f"the last good checkpoint out/ckpt.pt (step {last_good}) is untouched" in match[2]
    checkpoint = (fresh_project / "out" / "ckpt.pt").read_bytes()
    assert checkpoint == (fresh_project / "written" / f"ckpt-{last_good}.pt").read_bytes()
    series = (fresh_project / "metrics" / "train_loss.tsv").read_text().splitlines()[1:]
    assert max(int(line.split("\t")[0]) for line in series) < bad_step  # the bad step was never logged
