"""Bad inputs to each stage: one `error: ...` line on stderr, no traceback, a non-zero exit, nothing overwritten.

Every test runs a stage as a subprocess (`python -m stages.<name>`) in a copy of a tiny trained project and
compares the bytes of data/, out/ and metrics/ before and after.
"""

import dataclasses
import hashlib
import http.server
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import (
    ADDRESS_SPACE,
    DELETE,
    PROJECT_ROOT,
    TINY_PARAMS,
    copy_project,
    make_corpus,
    make_project,
    run_stage,
    set_params,
    snapshot,
    tool_env,
)
from nanogpt.config import SampleConfig
from nanogpt.tokenizer import fit_tokenizer, save_tokenizer

# Dropout on, as in a real run; 20 steps leave a checkpoint from the last evaluation.
OVERRIDES = {"model.dropout": 0.1, "train.max_iters": 20}
SAMPLE = [
    "--checkpoint",
    "out/ckpt.pt",
    "--vocab",
    "data/vocab.json",
    "--output",
    "out/samples.txt",
    "--metrics",
    "metrics/sample.json",
]


# ---------------------------------------------------------------- helpers


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """One `error: ...` line naming each of `fragments`, no traceback, a non-zero exit; return the line."""
    assert proc.returncode != 0, f"exit 0\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    print(lines[0])  # shown by `pytest -rP`: the list of messages
    return lines[0]


def run_expecting_error(project: Path, stage: str, args: list[str], *fragments: str) -> str:
    before = snapshot(project)
    message = assert_user_error(run_stage(project, stage, *args, check=False), *fragments)
    assert snapshot(project) == before, "an output file was changed, added or removed"
    return message


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Encoded, trained and sampled once: every output a bad input could overwrite exists. Don't change it."""
    project = make_project(
        tmp_path_factory.mktemp("trained") / "project", overrides=OVERRIDES, corpus=make_corpus(size=30_000)
    )
    for stage, args in (("encode", []), ("train", []), ("sample", [*SAMPLE, "--num_tokens", "50"])):
        run_stage(project, stage, *args)
    return project


@pytest.fixture
def trained(trained_template: Path, tmp_path: Path) -> Path:
    return copy_project(trained_template, tmp_path / "project")


class _Handler(http.server.BaseHTTPRequestHandler):
    """/corpus.txt serves `body` (CORPUS_SHA); the other paths fail in the ways their names say."""

    body = b"a tiny corpus\n" * 100

    def do_GET(self) -> None:
        if self.path == "/corpus.txt":
            self._reply(200, self.body, len(self.body))
        elif self.path == "/truncated.txt":  # promises more bytes than it sends, then hangs up
            self._reply(200, self.body[:500], len(self.body))
        elif self.path == "/error.txt":
            self._reply(500, b"oops", 4)
        elif self.path == "/loop.txt":  # redirects to itself
            self._reply(302, b"", 0, location=self.path)
        else:
            self._reply(404, b"not found", 9)

    def _reply(self, status: int, body: bytes, length: int, location: str | None = None) -> None:
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


CORPUS_SHA = hashlib.sha256(_Handler.body).hexdigest()


@pytest.fixture(scope="module")
def bad_http_server() -> Iterator[str]:
    """Base URL of a loopback HTTP server: /corpus.txt, /truncated.txt, /error.txt (500), /loop.txt (redirects to
    itself), anything else 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- params

PARAM_CASES = {
    "wrong type": ({"model.n_layer": "two"}, ["model.n_layer must be a valid integer", "'two'"]),
    "float for an integer": ({"train.batch_size": 8.5}, ["train.batch_size must be a valid integer", "8.5"]),
    "string for a boolean": (
        {"model.gradient_checkpointing": "yes"},
        ["model.gradient_checkpointing must be a valid boolean", "'yes'"],
    ),
    "negative learning rate": (
        {"train.learning_rate": -0.001},
        ["train.learning_rate must be greater than 0", "-0.001"],
    ),
    "dropout of 1": ({"model.dropout": 1.0}, ["model.dropout must be less than 1", "1.0"]),
    "n_embd not divisible by n_head": (
        {"model.n_embd": 30, "model.n_head": 4},
        ["model.n_embd (30) must be divisible by model.n_head (4)"],
    ),
    "batch_size 0": ({"train.batch_size": 0}, ["train.batch_size must be greater than or equal to 1, got 0"]),
    "unknown device": ({"train.device": "tpu"}, ["train.device", "'tpu'"]),
    "unknown dtype": ({"train.dtype": "fp8"}, ["train.dtype", "'fp8'"]),
    "misspelt key": ({"train.learnig_rate": 0.001}, ["unknown parameter train.learnig_rate"]),
    "missing key": ({"train.seed": DELETE}, ["missing train.seed"]),
    "several problems at once": (
        {"model.n_layer": "two", "train.batch_size": 0, "sample.top_p": 2},
        ["model.n_layer", "train.batch_size", "sample.top_p"],
    ),
    "block_size longer than the validation split": (
        {"model.block_size": 4000},
        ["model.block_size (4000)", "encode.val_fraction"],
    ),
    "cuda on a machine without it": ({"train.device": "cuda"}, ["train.device is 'cuda'", "no CUDA device"]),
}


@pytest.mark.parametrize("case", PARAM_CASES)
def test_bad_params_stop_training_before_any_output_is_touched(trained: Path, case: str) -> None:
    updates, fragments = PARAM_CASES[case]
    if case.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    set_params(trained / "params.yaml", updates, new_keys=True)
    run_expecting_error(trained, "train", [], *fragments)


def test_params_file_that_is_not_yaml(trained: Path) -> None:
    (trained / "params.yaml").write_text("model: [block_size: 32\n")
    run_expecting_error(trained, "train", [], "params.yaml is not valid YAML")


def test_missing_params_file(trained: Path) -> None:
    run_expecting_error(trained, "encode", ["--params", "nope.yaml"], "nope.yaml not found")


# ---------------------------------------------------------------- download


def test_download_of_missing_file(trained: Path) -> None:
    set_params(trained / "params.yaml", {"data.url": "file:///nonexistent/input.txt"})
    run_expecting_error(trained, "download", [], "/nonexistent/input.txt not found", "data.url")


def test_download_with_wrong_sha256_writes_nothing(trained: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("not the corpus\n")
    set_params(trained / "params.yaml", {"data.url": other.as_uri(), "data.sha256": "0" * 64})
    run_expecting_error(trained, "download", [], "sha256", "0" * 64, "nothing was written")


def test_download_from_unreachable_host_suggests_a_local_copy(trained: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x"
    set_params(trained / "params.yaml", {"data.url": url, "data.retries": 0, "data.timeout": 5})
    run_expecting_error(trained, "download", [], "cannot reach 127.0.0.1", "dvc exp run -S data.url=file:///")


def test_download_http_404(trained: Path, bad_http_server: str) -> None:
    set_params(trained / "params.yaml", {"data.url": f"{bad_http_server}/missing.txt", "data.retries": 0})
    run_expecting_error(trained, "download", [], "HTTP 404", f"{bad_http_server}/missing.txt", "data.url")


def test_download_http_500_after_retries(trained: Path, bad_http_server: str) -> None:
    set_params(trained / "params.yaml", {"data.url": f"{bad_http_server}/error.txt", "data.retries": 0})
    run_expecting_error(trained, "download", [], "HTTP 500", "after 1 attempt")


def test_download_cut_off_writes_nothing(trained: Path, bad_http_server: str) -> None:
    set_params(trained / "params.yaml", {"data.url": f"{bad_http_server}/truncated.txt", "data.retries": 0})
    run_expecting_error(trained, "download", [], "cut off")


def test_download_url_with_unknown_scheme(trained: Path) -> None:
    set_params(trained / "params.yaml", {"data.url": "ftp://example.com/input.txt"})
    run_expecting_error(
        trained, "download", [], "data.url must match pattern", "(the text to train on: http://, https:// or file://)"
    )


# Values that pass the types but cannot work: each once passed `validate` and failed later, in train or sample,
# after DVC had deleted the outputs. Written as params.yaml holds them (`dvc exp run -S x=inf` writes .inf).
UNWORKABLE_CASES = {
    "empty prompt": ({"sample.prompt": ""}, ["sample.prompt is empty, got ''", "give the text to continue"]),
    "infinite learning rate": (
        {"train.learning_rate": float("inf")},
        ["train.learning_rate must be a finite number, got inf"],
    ),
    "nan weight decay": ({"train.weight_decay": float("nan")}, ["train.weight_decay must be a finite number, got nan"]),
    "infinite timeout": ({"data.timeout": float("inf")}, ["data.timeout must be a finite number, got inf"]),
    "timeout past what a socket takes": ({"data.timeout": 1e300}, ["data.timeout must be less than or equal to 86400"]),
    "infinite temperature": ({"sample.temperature": float("inf")}, ["sample.temperature must be a finite number"]),
    "nan temperature": ({"sample.temperature": float("nan")}, ["sample.temperature must be a finite number, got nan"]),
    "temperature too small to divide by": (
        {"sample.temperature": 1e-40},
        ["sample.temperature must be 0 (greedy) or at least 0.0001, got 1e-40: use 0 for greedy"],
    ),
}


@pytest.mark.parametrize("case", UNWORKABLE_CASES)
def test_values_that_cannot_work_stop_validate(trained: Path, case: str) -> None:
    updates, fragments = UNWORKABLE_CASES[case]
    set_params(trained / "params.yaml", updates)
    run_expecting_error(trained, "validate", ["--output", "out/params.ok"], *fragments)


def test_stages_write_where_their_flags_say(trained: Path) -> None:
    """dvc.yaml names every file in each stage's cmd: the flags, not constants, decide where files go."""
    (trained / "elsewhere").mkdir()
    shutil.copy(trained / "data" / "input.txt", trained / "elsewhere" / "text.txt")
    before = snapshot(trained)

    run_stage(trained, "validate", "--output", "elsewhere/ok")
    run_stage(
        trained,
        "encode",
        *("--input", "elsewhere/text.txt", "--train", "elsewhere/t.pt", "--val", "elsewhere/v.pt"),
        *("--vocab", "elsewhere/vocab.json"),
    )
    run_stage(
        trained,
        "train",
        *("--data", "data", "--checkpoint", "elsewhere/ckpt.pt", "--resume", "elsewhere/resume"),
        *("--metrics", "elsewhere/metrics", "--tensorboard", "elsewhere/tb"),
    )

    written = {path.name for path in (trained / "elsewhere").rglob("*") if path.is_file()}
    assert {"ok", "t.pt", "v.pt", "vocab.json", "ckpt.pt", "train.json"} <= written
    assert snapshot(trained) == before  # data/, out/ and metrics/ untouched


def test_download_writes_where_its_flag_says(trained: Path, bad_http_server: str) -> None:
    set_params(trained / "params.yaml", {"data.url": f"{bad_http_server}/corpus.txt", "data.sha256": CORPUS_SHA})
    before = snapshot(trained)

    run_stage(trained, "download", "--output", "elsewhere/text.txt")

    assert (trained / "elsewhere" / "text.txt").read_bytes() == _Handler.body
    assert snapshot(trained) == before


# ---------------------------------------------------------------- data

DATA_CASES = {
    "empty file": (b"", ["data/input.txt is empty"]),
    "not UTF-8": ("café\n".encode("latin-1") * 50, ["data/input.txt is not valid UTF-8", "byte 3"]),
    "validation split with new characters": (
        b"abc abc cab\n" * 20 + b"XYZ",
        ["validation split", "'XYZ'", "lower encode.val_fraction", "encode.tokenizer=bpe"],
    ),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_corpus_stops_encode(trained: Path, case: str) -> None:
    content, fragments = DATA_CASES[case]
    (trained / "data" / "input.txt").write_bytes(content)
    run_expecting_error(trained, "encode", [], *fragments)


def test_missing_corpus_stops_encode(trained: Path) -> None:
    (trained / "data" / "input.txt").unlink()
    run_expecting_error(trained, "encode", [], "data/input.txt not found")


def test_text_too_short_for_one_block_names_block_size(trained: Path) -> None:
    (trained / "data" / "input.txt").write_text("abc abc cab.\n" * 2)
    assert run_stage(trained, "encode", check=False).returncode == 0
    run_expecting_error(trained, "train", [], "model.block_size (32)", "the train split has 23")


# ---------------------------------------------------------------- sampling

SAMPLE_CASES = {
    "characters outside the vocabulary": (["--prompt", "the ~é#{"], ["outside the vocabulary", "~", "é", "#", "{"]),
    "empty prompt": (["--prompt", ""], ["sample.prompt is empty"]),
    "negative num_tokens": (["--num_tokens", "-1"], ["sample.num_tokens must be greater than or equal to 0, got -1"]),
    "num_tokens not a number": (["--num_tokens", "abc"], ["argument --num_tokens", "'abc'", "--help"]),
    "num_samples 0": (["--num_samples", "0"], ["sample.num_samples must be greater than or equal to 1, got 0"]),
    "top_k 0": (["--top_k", "0"], ["sample.top_k must be greater than or equal to 1, got 0", "null: off"]),
    "top_k neither a number nor none": (
        ["--top_k", "off"],
        ["argument --top_k", "'off'", "none turns it off", "--help"],
    ),
    "top_p 0": (["--top_p", "0"], ["sample.top_p must be greater than 0, got 0.0", "null: off"]),
    "top_p 1.5": (["--top_p", "1.5"], ["sample.top_p must be less than or equal to 1, got 1.5", "null: off"]),
    "negative temperature": (
        ["--temperature", "-1"],
        ["sample.temperature must be greater than or equal to 0", "got -1.0"],
    ),
    "unknown device": (["--device", "tpu"], ["--device", "'tpu'"]),
    "unknown quantization": (["--quantize", "int4"], ["sample.quantize must be", "'int4'"]),
    "unknown escape in the prompt": (["--prompt", "ROMEO\\q"], ["sample.prompt has an unknown escape \\q"]),
    "missing checkpoint": (["--checkpoint", "out/missing.pt"], ["checkpoint out/missing.pt not found"]),
    "missing vocabulary": (["--vocab", "data/missing.json"], ["vocabulary data/missing.json not found"]),
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_bad_sampling_input(trained: Path, case: str) -> None:
    args, fragments = SAMPLE_CASES[case]
    run_expecting_error(trained, "sample", [*SAMPLE, *args], *fragments)


def test_sampling_on_cuda_without_it(trained: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_expecting_error(trained, "sample", [*SAMPLE, "--device", "cuda"], "--device is 'cuda'", "no CUDA device")


# ---------------------------------------------------------------- the original README's commands

ORIGINAL_COMMAND = (
    r'python stages/sample.py --checkpoint out/ckpt.pt --prompt "\n" --num_tokens 500 --temperature 1.0 --top_k 40'
)


def shell(project: Path, command: str) -> subprocess.CompletedProcess[str]:
    """`command` as a user types it, through bash, so the shell's quoting applies, in `project`."""
    # `python stages/sample.py` puts stages/ on sys.path, not the project, so nanogpt would come from wherever the
    # test interpreter installed it; a user's checkout finds its own (pip install -e .), and so does this copy
    env = {**tool_env(project), "PYTHONPATH": str(project)}
    return subprocess.run(
        ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_original_readme_sample_command_works_as_typed(trained: Path) -> None:
    proc = shell(trained, ORIGINAL_COMMAND)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("\n")  # the prompt "\n" is a newline, and it starts the sample
    assert len(proc.stdout) == 1 + 500 + 1  # prompt, tokens of a char model, the closing newline


def test_none_turns_off_what_params_yaml_turns_on(trained: Path) -> None:
    sample = "python stages/sample.py --num_tokens 60 --device cpu"  # int8 is for the CPU
    set_params(trained / "params.yaml", {"sample.top_k": None, "sample.top_p": None, "sample.quantize": None})
    off = shell(trained, sample)
    set_params(trained / "params.yaml", {"sample.top_k": 1, "sample.top_p": 0.5, "sample.quantize": "int8"})
    on = shell(trained, sample)
    turned_off = shell(trained, f"{sample} --top_k none --top_p null --quantize none")

    assert off.returncode == on.returncode == turned_off.returncode == 0, off.stderr + on.stderr + turned_off.stderr
    assert on.stdout != off.stdout  # params.yaml's settings took effect...
    assert turned_off.stdout == off.stdout  # ...and the flags turned every one of them off again


def test_double_backslash_in_the_prompt_is_one_backslash(trained: Path) -> None:
    proc = shell(trained, r"python stages/sample.py --prompt 'ROMEO\\nJULIET'")

    # the char vocabulary has no backslash: the error names one, so \\n stayed a backslash and an n
    assert_user_error(proc, "outside the vocabulary: '\\\\'")


def test_help_shows_its_examples_as_written_and_every_flag() -> None:
    proc = shell(PROJECT_ROOT, "python stages/sample.py --help")

    assert proc.returncode == 0, proc.stderr
    assert f"\n    {ORIGINAL_COMMAND}\n" in proc.stdout
    assert (
        '\n    python stages/sample.py --prompt "ROMEO:" --num_tokens 500 --temperature 0.8 --top_k 40\n' in proc.stdout
    )
    for field in dataclasses.fields(SampleConfig):
        assert f"--{field.name}" in proc.stdout
    assert "--compile" in proc.stdout


def _truncated(ckpt: Path) -> bytes:
    return ckpt.read_bytes()[: ckpt.stat().st_size // 2]


def _foreign(ckpt: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    return buffer.getvalue()


BAD_CHECKPOINTS = {
    "truncated": (_truncated, ["checkpoint out/bad.pt is corrupt or not a file this project wrote"]),
    "text file": (lambda ckpt: b"hello\n", ["checkpoint out/bad.pt is corrupt or not a file this project wrote"]),
    "another program's tensors": (_foreign, ["checkpoint out/bad.pt is not a checkpoint of this project"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_file_is_named(trained: Path, case: str) -> None:
    make, fragments = BAD_CHECKPOINTS[case]
    (trained / "out" / "bad.pt").write_bytes(make(trained / "out" / "ckpt.pt"))
    run_expecting_error(trained, "sample", [*SAMPLE, "--checkpoint", "out/bad.pt"], *fragments)


def test_checkpoint_trained_on_another_vocabulary(trained: Path) -> None:
    (trained / "data" / "other_vocab.json").write_text(json.dumps({"kind": "char", "chars": "\n abc"}))
    run_expecting_error(
        trained,
        "sample",
        [*SAMPLE, "--vocab", "data/other_vocab.json"],
        "checkpoint out/ckpt.pt was trained with another vocabulary than data/other_vocab.json",
    )


def test_top_k_larger_than_vocabulary_is_clamped(trained: Path) -> None:
    vocab_size = len(json.loads((trained / "data" / "vocab.json").read_text())["chars"])
    proc = run_stage(trained, "sample", *SAMPLE, "--top_k", "1000", "--num_tokens", "20", check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"note: sample.top_k (1000) is larger than the vocabulary; clamped to {vocab_size}" in proc.stdout
    print(proc.stdout.strip())


def test_temperature_zero_is_greedy(trained: Path) -> None:
    outputs = []
    for seed in ("1", "2"):  # greedy decoding ignores the seed
        proc = run_stage(
            trained, "sample", *SAMPLE, "--temperature", "0", "--num_tokens", "40", "--seed", seed, check=False
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append((trained / "out" / "samples.txt").read_text())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == len("\n") + 40 + len("\n")


def start_streaming(project: Path, num_tokens: int) -> subprocess.Popen:
    """The sample stage streaming to a pipe; returns once its first characters arrived."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.sample", "--num_tokens", str(num_tokens)],
        cwd=project,
        env=tool_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.read(5)
    return proc


def test_sampling_into_a_pipe_closed_early_ends_quietly(trained: Path) -> None:
    """`python stages/sample.py | head`: the reader leaves while the text streams (more than a pipe buffer)."""
    proc = start_streaming(trained, 100_000)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert stderr == ""


@pytest.mark.parametrize(
    ("flag", "weights"),
    [
        ([], "int8"),
        (["--quantize", "auto"], "int8"),
        (["--quantize", "int8"], "int8"),
        (["--quantize", "none"], "float32"),
    ],
    ids=["params_auto", "auto", "int8", "none"],
)
def test_quantize_auto_samples_with_int8_weights_on_the_cpu_and_the_metrics_say_so(
    trained: Path, flag: list[str], weights: str
) -> None:
    set_params(trained / "params.yaml", {"sample.quantize": "auto"})  # the default; the flags override it
    proc = run_stage(trained, "sample", *SAMPLE, *flag, "--num_tokens", "40", "--device", "cpu", check=False)

    assert proc.returncode == 0, proc.stderr
    assert len((trained / "out" / "samples.txt").read_text()) == len("\n") + 40 + len("\n")
    assert json.loads((trained / "metrics" / "sample.json").read_text())["weights"] == weights


def test_prompt_and_generation_longer_than_block_size(trained: Path) -> None:
    block_size = TINY_PARAMS["model.block_size"]
    prompt = (trained / "data" / "input.txt").read_text()[: 3 * block_size]
    num_tokens = 3 * block_size
    proc = run_stage(trained, "sample", *SAMPLE, "--prompt", prompt, "--num_tokens", str(num_tokens), check=False)
    assert proc.returncode == 0, proc.stderr
    text = (trained / "out" / "samples.txt").read_text()
    assert text.startswith(prompt)
    assert len(text) == len(prompt) + num_tokens + len("\n")


def test_ctrl_c_while_sampling_ends_quietly_with_status_130(trained: Path) -> None:
    before = snapshot(trained)
    proc = start_streaming(trained, 1_000_000)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stderr.strip() == "interrupted"
    assert snapshot(trained) == before  # nothing written


# A sitecustomize that makes the stage's first import of the package slow, and says when it has begun, so that the
# test's SIGINT lands inside the stage's imports every time (the product is unchanged; only this test's Python is).
SLOW_IMPORT = """
import os, pathlib, sys, time

class SlowPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "nanogpt":
            pathlib.Path(os.environ["IMPORT_STARTED"]).touch()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowPackage())
"""


@pytest.mark.parametrize("stage", ["validate", "download", "encode", "train", "sample", "export"])
def test_ctrl_c_while_a_stage_imports_is_one_line_and_status_130(stage: str, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT, encoding="utf-8")
    started = tmp_path / "import-started"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{PROJECT_ROOT}", "IMPORT_STARTED": str(started)}
    proc = subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), f"the stage never began importing nanogpt: {proc.stderr}"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()

    assert (proc.returncode, stderr) == (130, "interrupted\n")
    assert {path.name for path in tmp_path.iterdir()} <= {"sitecustomize.py", "import-started", "__pycache__"}


@pytest.mark.parametrize("stage", ["validate", "download"])
def test_stages_before_encode_do_not_load_torch(stage: str) -> None:
    """The validate and download stages start in a fraction of a second: they import none of torch (validate runs
    in every experiment that changes a param)."""
    code = f"import sys, stages.{stage}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_sample_metrics_tell_start_up_from_decoding(trained: Path) -> None:
    proc = run_stage(trained, "sample", *SAMPLE, "--num_tokens", "200", check=False)
    assert proc.returncode == 0, proc.stderr

    metrics = json.loads((trained / "metrics" / "sample.json").read_text())

    assert {"tokens_per_sec", "decode_tokens_per_sec", "first_tokens_s", "startup_s"} <= metrics.keys()
    assert metrics["num_tokens"] == 200 and metrics["num_samples"] == 1
    assert metrics["first_tokens_s"] >= 0 and metrics["startup_s"] > 0
    assert metrics["decode_tokens_per_sec"] > 0  # tokens kept arriving after the first ones


# ---------------------------------------------------------------- inputs that once ended in a traceback

MAX_RSS = 1536 << 20  # bytes: a stage that refuses at once stays near the size of Python + torch (~600 MiB)


# sets the cap, then runs the stage as a child of its own and writes that child's peak RSS (kB) into the file argv[1].
# A fresh process: one exec'd straight from pytest would inherit pytest's own peak (wait4 reports the larger of the
# process's peaks before and after its exec, and a spawned child starts from its parent's memory), which on a GPU
# machine, with torch's CUDA libraries loaded in pytest, is over MAX_RSS whatever the stage does.
_CAPPED = """
import os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({0}, {0}))
_, status, usage = os.wait4(os.posix_spawn(sys.executable, sys.argv[2:], os.environ), 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):  # end as the stage ended
    if os.WTERMSIG(status) != signal.SIGKILL:
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_capped(project: Path, stage: str, args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m stages.<stage> *args` in `project` with its address space capped, on the CPU; the result and its
    peak RSS in bytes (of the stage alone)."""
    if stage == "sample":
        args = ["--device", "cpu", *args]  # a later --device in args wins
    cmd = [sys.executable, "-m", f"stages.{stage}", *args]
    # no GPU for it: CUDA cannot start under the cap (test_runtime.py's GPU test checks what a stage says then)
    env = {**tool_env(project), "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_rss_kb"
        proc = subprocess.Popen(
            [sys.executable, "-c", _CAPPED.format(ADDRESS_SPACE), str(peak), *cmd],
            cwd=project,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a group of its own, the stage with it: a timeout stops both
        )
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
        assert peak.exists(), f"the capped wrapper did not run the stage: {result.stderr}"
        return result, int(peak.read_text()) * 1024


def set_url(url: str) -> Callable[[Path, str], None]:
    return lambda project, server: set_params(project / "params.yaml", {"data.url": url.format(server=server)})


def write(name: str, content: str | bytes) -> Callable[[Path, str], None]:
    def setup(project: Path, server: str) -> None:
        path = project / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return setup


def folder(name: str) -> Callable[[Path, str], None]:
    return lambda project, server: (project / name).mkdir()


def edit_checkpoint(change: Callable[[dict], None]) -> Callable[[Path, str], None]:
    def setup(project: Path, server: str) -> None:
        ckpt = torch.load(project / "out/ckpt.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, project / "out/ckpt.pt")

    return setup


def params(updates: dict) -> Callable[[Path, str], None]:
    return lambda project, server: set_params(project / "params.yaml", updates)


def bpe_vocabulary(project: Path, server: str) -> None:
    """A BPE vocab.json beside the char token files: larger than the char vocabulary, so every id fits it."""
    text = (project / "data/input.txt").read_text()
    save_tokenizer(fit_tokenizer("bpe", text, 300), project / "data/vocab.json")


def duplicate_key(project: Path, server: str) -> None:
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("  max_iters: 20\n", "  max_iters: 20\n  max_iters: 2000\n"))


def nothing(project: Path, server: str) -> None:
    pass


# case: (setup, stage, args, fragments of the one error line)
TRACEBACK_CASES: dict[str, tuple[Callable[[Path, str], None], str, list[str], list[str]]] = {
    "redirect loop": (set_url("{server}/loop.txt"), "download", [], ["loop.txt redirects in a loop", "data.url"]),
    "port out of range": (
        set_url("http://127.0.0.1:99999/x"),
        "download",
        [],
        ["data.url is not a valid URL (Port out of range 0-65535)", "'http://127.0.0.1:99999/x'"],
    ),
    "URL without a host": (
        set_url("http:///input.txt"),
        "download",
        [],
        ["data.url has no host", "'http:///input.txt'"],
    ),
    "malformed IPv6 host": (set_url("http://[::1/x"), "download", [], ["data.url is not a valid URL", "IPv6"]),
    "binary params.yaml": (
        write("params.yaml", bytes(range(256))),
        "train",
        [],
        ["params.yaml is not UTF-8 text (byte 128)"],
    ),
    "--params a directory": (folder("pdir"), "train", ["--params", "pdir"], ["pdir is a directory"]),
    "--output a directory": (
        folder("out/odir"),
        "sample",
        [*SAMPLE, "--output", "out/odir"],
        ["--output out/odir is a directory"],
    ),
    "--metrics a directory": (
        folder("out/mdir"),
        "sample",
        [*SAMPLE, "--metrics", "out/mdir"],
        ["--metrics out/mdir is a directory"],
    ),
    "--vocab a directory": (
        folder("data/vdir"),
        "sample",
        [*SAMPLE, "--vocab", "data/vdir"],
        ["vocabulary data/vdir is a directory"],
    ),
    "vocab.json a JSON list": (
        write("data/vocab.json", "[1, 2]"),
        "train",
        [],
        ["vocabulary data/vocab.json is corrupt", "got list", "dvc repro encode"],
    ),
    "vocab.json with chars: 5": (
        write("data/vocab.json", '{"kind": "char", "chars": 5}'),
        "sample",
        SAMPLE,
        ["vocabulary data/vocab.json is corrupt", "'chars' must be a string", "got 5"],
    ),
    "vocab.json a garbage BPE object": (
        write("data/vocab.json", '{"kind": "bpe", "tokenizer": {"merges": 3}}'),
        "train",
        [],
        ["vocabulary data/vocab.json is corrupt", "not a Hugging Face tokenizer"],
    ),
    "checkpoint without its tokenizer": (
        edit_checkpoint(lambda c: c.pop("tokenizer")),
        "sample",
        SAMPLE,
        ["checkpoint out/ckpt.pt is incomplete: tokenizer is missing", "dvc repro train"],
    ),
    "checkpoint without its step": (
        edit_checkpoint(lambda c: c.pop("step")),
        "sample",
        SAMPLE,
        ["checkpoint out/ckpt.pt is incomplete: step is missing"],
    ),
    "checkpoint with chars: 12": (
        edit_checkpoint(lambda c: c["tokenizer"].update(chars=12)),
        "sample",
        SAMPLE,
        ["checkpoint out/ckpt.pt has a corrupt tokenizer", "got 12"],
    ),
    "sample.seed 2**70": (
        nothing,
        "sample",
        [*SAMPLE, "--seed", str(2**70)],
        ["sample.seed must be less than or equal to 9223372036854775807", str(2**70)],
    ),
    "train.seed 2**70": (
        params({"train.seed": 2**70}),
        "train",
        [],
        ["train.seed must be less than or equal to 9223372036854775807"],
    ),
    "batch_size 1e10": (
        params({"train.batch_size": 10**10}),
        "train",
        [],
        ["out of memory training on cpu", "lower train.batch_size"],
    ),
    "n_embd 1e6": (
        params({"model.n_embd": 10**6}),
        "train",
        [],
        ["out of memory building the model on cpu", "lower model.n_embd or model.n_layer"],
    ),
    "num_samples 1e9": (
        nothing,
        "sample",
        [*SAMPLE, "--num_samples", str(10**9)],
        ["out of memory generating 1,000,000,000 samples", "lower sample.num_samples"],
    ),
    # silent nonsense: now refused
    "BPE vocab.json beside char token files": (
        bpe_vocabulary,
        "train",
        [],
        ["token file data/train.pt was encoded with another tokenizer than data/vocab.json", "dvc repro encode"],
    ),
    "a key twice in params.yaml": (
        duplicate_key,
        "train",
        [],
        ["params.yaml: key 'max_iters' appears twice, on lines", "keep one"],
    ),
}


@pytest.mark.parametrize("case", TRACEBACK_CASES)
def test_bad_input_is_one_error_line(trained: Path, bad_http_server: str, case: str) -> None:
    """Each of these once ended in a traceback (or trained on nonsense): now one `error:` line, exit status 2, no
    output touched, and no big allocation on the way (the out-of-memory ones fail at their first big tensor)."""
    setup, stage, args, fragments = TRACEBACK_CASES[case]
    setup(trained, bad_http_server)
    before = snapshot(trained)

    proc, peak_rss = run_capped(trained, stage, args)

    assert_user_error(proc, *fragments)
    assert proc.returncode == 2
    assert snapshot(trained) == before, "an output file was changed, added or removed"
    assert peak_rss < MAX_RSS, f"peak RSS {peak_rss >> 20} MiB"


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Makes a folder read-only, even for root (which ignores permission bits): `chattr +i` there, `chmod a-w`
    otherwise; skips the test where neither works. Undone at teardown, so that the folder can be deleted."""
    undo: list[Callable[[], None]] = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], check=False).returncode:
                pytest.skip("running as root, and chattr +i does not work here")
            undo.append(lambda: subprocess.run(["chattr", "-i", folder], check=True))
        else:
            mode = folder.stat().st_mode
            folder.chmod(mode & ~0o222)
            undo.append(lambda: folder.chmod(mode))

    yield make
    for step in undo:
        step()


READ_ONLY_CASES = {  # stage, its args, the folder made read-only, fragments
    "train, out/": ("train", [], "out", ["cannot write checkpoint out/ckpt.pt", "make out a writable folder"]),
    "train, metrics/": ("train", [], "metrics", ["cannot write metrics metrics/train.json"]),
    "sample, out/": ("sample", SAMPLE, "out", ["cannot write --output out/samples.txt", "make out a writable folder"]),
    "encode, data/": ("encode", [], "data", ["cannot write encoded data data/train.pt"]),
    "download, data/": ("download", [], "data", ["cannot write the corpus data/input.txt"]),
}


@pytest.mark.parametrize("case", READ_ONLY_CASES)
def test_read_only_output_folder_is_refused_before_the_work(trained: Path, read_only, case: str) -> None:
    """The stage says so at once, instead of failing with a traceback after training or sampling."""
    stage, args, folder, fragments = READ_ONLY_CASES[case]
    set_params(trained / "params.yaml", {"data.url": (trained / "data/input.txt").as_uri()})  # no network
    read_only(trained / folder)

    message = run_expecting_error(trained, stage, args, *fragments)

    assert "Operation not permitted" in message or "Permission denied" in message


WARNING_CASES = {
    "warmup longer than the run": (
        {"train.warmup_iters": 25},
        "train.warmup_iters (25) >= train.max_iters (20): the whole run is warmup",
    ),
    "fp16 on the CPU": ({"train.dtype": "fp16"}, "train.dtype is fp16 on the CPU"),
}


@pytest.mark.parametrize("case", WARNING_CASES)
def test_likely_mistake_in_train_params_is_one_warning_line(trained: Path, case: str) -> None:
    updates, fragment = WARNING_CASES[case]
    set_params(trained / "params.yaml", {**updates, "train.max_iters": 20})

    proc = run_stage(trained, "train", check=False)

    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and fragment in warnings[0], proc.stderr
    assert (trained / "out/ckpt.pt").exists()  # a warning, not a refusal: training ran


def test_long_generation_that_shows_nothing_warns_before_it_starts(trained: Path) -> None:
    """A million tokens into a file: one warning line at once, rather than silence for an hour."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.sample", *SAMPLE, "--num_tokens", "1000000"],
        cwd=trained,
        env=tool_env(trained),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the first line, or nothing after two minutes (start-up takes seconds): the generation itself takes far longer
    arrived, _, _ = select.select([proc.stderr], [], [], 120)
    first_line = proc.stderr.readline() if arrived else ""
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)

    assert first_line.startswith("warning: sample.num_tokens is 1,000,000 and nothing shows until all are generated")
    assert proc.returncode == 130  # it was still generating
