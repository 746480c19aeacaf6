"""The sample stage's work (nanogpt/sample.py): what it writes, and what it says when it cannot run."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_project, tiny_config, tool_env
from nanogpt.checkpoint import save_checkpoint
from nanogpt.errors import UserError
from nanogpt.model import GPT
from nanogpt.sample import SampleRun, run_sampling
from nanogpt.tokenizer import CharTokenizer

CHARS = "\n abcdefghijklmnopqrstuvwxyz"


def save_tiny_checkpoint(path: Path) -> Path:
    """An untrained tiny model's checkpoint (what it says is noise, which is all these tests need)."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, GPT(tiny_config().model, len(CHARS)), CharTokenizer(CHARS), step=1, val_loss=3.0)
    return path


@pytest.mark.parametrize("num_samples", [1, 2])
def test_the_output_holds_the_returned_samples(tmp_path, num_samples):
    """One sample is written as it is generated, several once they are all there: the same file either way."""
    cfg = tiny_config({"sample.num_samples": num_samples, "sample.num_tokens": 300}).sample
    output = tmp_path / "samples.txt"
    output.write_text("old samples\n")
    run = SampleRun(save_tiny_checkpoint(tmp_path / "ckpt.pt"), None, output, None, "cpu")

    texts = run_sampling(cfg, run, stream=None)

    expected = (
        texts[0] + "\n" if num_samples == 1 else "".join(f"=== sample {i + 1} ===\n{t}\n" for i, t in enumerate(texts))
    )
    assert output.read_text() == expected
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    run = SampleRun(tmp_path / "out" / "ckpt.pt", None, None, None, "cpu")

    with pytest.raises(UserError, match=r"checkpoint .*ckpt\.pt not found: train a model first \(`dvc repro`\)"):
        run_sampling(tiny_config().sample, run, stream=None)


def limit_file_size(limit: int) -> None:
    """In the child process: files can grow to `limit` bytes, a write beyond fails (EFBIG, as a full disk fails
    with ENOSPC; Python ignores the SIGXFSZ that comes with it)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs a file size limit (POSIX)")
def test_a_failed_write_is_one_line_and_leaves_the_old_samples(tmp_path):
    """Samples far larger than the file size limit: the write fails while they are generated, the stage says so in
    one line, and the old samples file stays as it was, with no temporary file beside it."""
    project = make_project(tmp_path / "project")
    save_tiny_checkpoint(project / "out" / "ckpt.pt")
    samples = project / "out" / "samples.txt"
    samples.write_text("old samples\n")
    command = [sys.executable, "-m", "stages.sample", "--output", "out/samples.txt", "--num_tokens", "20000"]

    proc = subprocess.run(
        command,
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: limit_file_size(4096),
        check=False,
    )

    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: cannot write out/samples.txt: File too large\n"
    assert samples.read_text() == "old samples\n"
    assert not list(samples.parent.glob("*.tmp"))
