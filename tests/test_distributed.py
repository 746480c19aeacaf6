"""Data-parallel training under torchrun (gloo on the CPU) and gradient accumulation.

The promise: N ranks x k micro-steps x batch b train on exactly the windows of one process with batch N*k*b,
so the loss curves match to float precision; global rank 0 alone writes the checkpoint, metrics and resume
state; and an interrupted torchrun run resumes, on one host or several. Each run drives the real torchrun
CLI in a copy of the project, the way a user launches it; the one-process references run in-process.
"""

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_PARAMS, copy_project, make_corpus, make_project, set_params
from nanogpt.config import load_config
from nanogpt.train import TrainPaths, train

# eval and resume state every 10 steps; rotary embeddings and the weights' average on, as in the defaults
PARAMS = {**TINY_PARAMS, "train.max_iters": 80, "model.rope": True, "train.ema": 0.9}
BATCH = PARAMS["train.batch_size"]
BLOCK = PARAMS["model.block_size"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` command, for this interpreter
# One thread per process: two ranks already fill the two cores of a CI machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
for _name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
OUTPUTS = {"out/ckpt.pt", "metrics/train.json", "metrics/train_loss.tsv", "metrics/val_loss.tsv"}
STEP_LINE = re.compile(r"^step (\d+):", re.MULTILINE)
INTERRUPTED = re.compile(r"interrupted by SIGTERM at step (\d+)")
RESUMING = re.compile(r"resuming from step (\d+) ")
TIMEOUT = 180  # seconds: a hung collective fails the test instead of the CI job


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's code and params (tiny CPU model, 80 steps) with the encode stage's data/ in place."""
    root = make_project(tmp_path_factory.mktemp("encoded") / "project", overrides=PARAMS, corpus=make_corpus())
    subprocess.run([sys.executable, "-m", "stages.encode"], cwd=root, env=ENV, check=True, capture_output=True)
    return root


def train_in_process(project: Path, overrides: dict[str, Any]) -> Path:
    """One process, the project's params with `overrides`; outputs under `project` as the stage writes them."""
    cfg = load_config(project / "params.yaml", overrides)
    paths = TrainPaths(
        data_dir=project / "data",
        checkpoint=project / "out" / "ckpt.pt",
        resume_dir=project / "out" / "resume",
        metrics_dir=project / "metrics",
        tensorboard_dir=project / "out" / "tensorboard",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers run (OMP_NUM_THREADS=1): a tiny model only loses by more
    try:
        train(cfg, paths, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return project


@pytest.fixture(scope="module")
def one_process_double_batch(encoded: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The reference: one process with batch 2 * BATCH, uninterrupted, given param overrides (made once each)."""
    done: dict[str, Path] = {}

    def reference(**overrides: Any) -> Path:
        key = repr(sorted(overrides.items()))
        if key not in done:
            project = copy_project(encoded, tmp_path_factory.mktemp("reference") / "project")
            done[key] = train_in_process(
                project, {"train.batch_size": 2 * BATCH, **{f"train.{k}": v for k, v in overrides.items()}}
            )
        return done[key]

    return reference


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def assert_same_trajectory(got: Path, want: Path) -> None:
    """The train and val series of two projects agree: same steps, values within float tolerance."""
    for name, columns in (("train_loss.tsv", ("train_loss", "lr")), ("val_loss.tsv", ("val_loss", "val_bpc"))):
        got_rows, want_rows = read_tsv(got / "metrics" / name), read_tsv(want / "metrics" / name)
        assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows], name
        for column in columns:
            got_values = [float(r[column]) for r in got_rows]
            assert got_values == pytest.approx([float(r[column]) for r in want_rows], rel=1e-4), f"{name}: {column}"


def summary(project: Path) -> dict[str, Any]:
    return json.loads((project / "metrics" / "train.json").read_text())


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(*runs: tuple[Path, list[str]]) -> Iterator[list[subprocess.Popen]]:
    """Start each (cwd, torchrun args) in its own session, output merged; on the way out, end what still runs."""
    procs = [
        subprocess.Popen(
            [*TORCHRUN, *args],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cwd, args in runs
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def finish(procs: list[subprocess.Popen], head: str = "") -> list[tuple[int, str]]:
    """Wait for every process; (exit code, output) of each, `head` prepended to the first's output."""
    results = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=TIMEOUT)
        results.append((proc.returncode, (head if i == 0 else "") + out))
    return results


def sigterm_after_step(procs: list[subprocess.Popen], step: int) -> str:
    """Read the first process's log until it reports `step` or later, then SIGTERM that process (torchrun,
    which passes it on to its workers); the log read so far."""
    seen = []
    assert procs[0].stdout is not None
    for line in procs[0].stdout:
        seen.append(line)
        match = STEP_LINE.match(line)
        if match and int(match[1]) >= step:
            procs[0].send_signal(signal.SIGTERM)
            break
    return "".join(seen)


def single_host(nproc: int) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "stages.train"]


def host(node_rank: int, port: int) -> list[str]:
    """torchrun's arguments for one of two hosts with one process each (static rendezvous: the host with
    --node_rank=0 holds global rank 0)."""
    return [
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--nproc_per_node=1",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "-m",
        "stages.train",
    ]


def worker_crashed(output: str) -> bool:
    """Whether a worker died of an exception: torch.distributed prefixes their tracebacks with [rankN]."""
    return re.search(r"^\[rank\d+\]", output, re.MULTILINE) is not None


# ---------------------------------------------------------------- one host


# train.eval_iters counts batches of train.batch_size on each rank, so N ranks with batch b evaluate what one
# process with batch N*b does; with micro-steps the batches differ, and only the whole split (null) compares.
# Gradient checkpointing recomputes the same numbers, so the reference runs without it.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch_size", "accum", "eval_iters", "optimizer", "checkpointing"),
    [(BATCH, 1, 2, "adamw", False), (BATCH // 2, 2, None, "muon", True)],
    ids=["2 ranks x batch b, adamw", "2 ranks x 2 micro-steps x batch b/2, muon, gradient checkpointing"],
)
def test_two_ranks_follow_the_trajectory_of_one_process_with_the_whole_batch(
    encoded: Path,
    one_process_double_batch: Callable[..., Path],
    tmp_path: Path,
    batch_size: int,
    accum: int,
    eval_iters: int | None,
    optimizer: str,
    checkpointing: bool,
) -> None:
    project = copy_project(encoded, tmp_path / "project")
    set_params(
        project / "params.yaml",
        {
            "train.batch_size": batch_size,
            "train.grad_accum_steps": accum,
            "train.eval_iters": eval_iters,
            "train.optimizer": optimizer,
            "model.gradient_checkpointing": checkpointing,
        },
    )
    before = files(project)

    with launched((project, single_host(2))) as procs:
        [(code, out)] = finish(procs)

    assert code == 0, out
    assert_same_trajectory(project, one_process_double_batch(eval_iters=eval_iters, optimizer=optimizer))
    assert summary(project)["tokens_per_step"] == 2 * accum * batch_size * BLOCK == 2 * BATCH * BLOCK
    assert summary(project)["steps"] == PARAMS["train.max_iters"]
    # rank 0 alone wrote: exactly the stage's outputs appeared (no resume state left, nothing per rank),
    # and one process reported
    assert files(project) - before == OUTPUTS
    assert out.count("best_val_loss=") == 1 and out.count("no resume state") == 1, out


def test_gradient_accumulation_follows_the_trajectory_of_one_batch_of_the_whole_size(
    encoded: Path, one_process_double_batch: Callable[..., Path], tmp_path: Path
) -> None:
    project = train_in_process(
        copy_project(encoded, tmp_path / "project"),
        {"train.batch_size": BATCH, "train.grad_accum_steps": 2, "train.eval_iters": None},
    )

    assert_same_trajectory(project, one_process_double_batch(eval_iters=None))
    assert summary(project)["tokens_per_step"] == 2 * BATCH * BLOCK


@pytest.mark.slow
def test_interrupted_torchrun_resumes_where_it_stopped_and_finishes(
    encoded: Path, one_process_double_batch: Callable[..., Path], tmp_path: Path
) -> None:
    project = copy_project(encoded, tmp_path / "project")
    before = files(project)

    with launched((project, single_host(2))) as procs:
        head = sigterm_after_step(procs, 20)
        [(code, out)] = finish(procs, head)

    assert code != 0, out
    stopped = [int(s) for s in INTERRUPTED.findall(out)]
    assert len(stopped) == 1 and 20 <= stopped[0] < PARAMS["train.max_iters"], out  # rank 0 alone reports
    assert not worker_crashed(out), out  # the other rank stopped at the same step, not inside a collective
    assert list((project / "out" / "resume").glob("*/state.pt"))  # out/resume/<the run's resume key>/

    with launched((project, single_host(2))) as procs:
        [(code, out)] = finish(procs)

    assert code == 0, out
    assert [int(s) for s in RESUMING.findall(out)] == stopped, out
    assert_same_trajectory(project, one_process_double_batch())  # the interruption changed nothing
    assert files(project) - before == OUTPUTS  # the resume state is gone once the run finished


# ---------------------------------------------------------------- several hosts (two folders on localhost)


@pytest.mark.slow
def test_two_hosts_resume_from_the_state_rank_0_wrote_once_every_host_sees_it(
    encoded: Path, one_process_double_batch: Callable[..., Path], tmp_path: Path
) -> None:
    # each "host" has its own copy of the project: no shared filesystem
    head, other = copy_project(encoded, tmp_path / "host0"), copy_project(encoded, tmp_path / "host1")
    head_before, other_before = files(head), files(other)

    # SIGTERM reaches host 0's torchrun only: rank 1 gets no signal and must still stop at the same step
    port = free_port()
    with launched((head, host(0, port)), (other, host(1, port))) as procs:
        log = sigterm_after_step(procs, 20)
        (_, head_out), (other_code, other_out) = finish(procs, log)

    stopped = [int(s) for s in INTERRUPTED.findall(head_out)]
    assert len(stopped) == 1, head_out
    assert not worker_crashed(head_out + other_out), head_out + other_out
    assert other_code != 0  # its worker left with the interruption's exit code
    assert files(other) == other_before  # global rank 0's host holds all the state
    [state] = (head / "out" / "resume").glob("*/state.pt")
    saved = digest(state)

    # host 1 cannot see the resume state: both ranks refuse rather than train from different steps
    port = free_port()
    with launched((head, host(0, port)), (other, host(1, port))) as procs:
        (head_code, head_out), (other_code, other_out) = finish(procs)

    assert head_code != 0 and other_code != 0
    assert "every host must see the one rank 0 writes" in head_out, head_out
    assert not STEP_LINE.search(head_out) and digest(state) == saved

    # with a copy of it on host 1 (as a shared filesystem would give), the run resumes and finishes
    shutil.copytree(head / "out" / "resume", other / "out" / "resume")
    other_before = files(other)
    port = free_port()
    with launched((head, host(0, port)), (other, host(1, port))) as procs:
        (head_code, head_out), (other_code, other_out) = finish(procs)

    assert head_code == 0 and other_code == 0, head_out + other_out
    assert [int(s) for s in RESUMING.findall(head_out)] == stopped, head_out
    assert_same_trajectory(head, one_process_double_batch())
    assert files(head) - head_before == OUTPUTS
    assert files(other) == other_before  # host 1 wrote nothing
