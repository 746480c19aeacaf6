"""Shared fixtures: a generated corpus, a loopback HTTP server, and a tiny copy of the project in its own
git + DVC repository, plus helpers that drive the real `dvc` and `git` CLIs in it.

Nothing here touches the network: the pipeline's `data.url` points at a server on 127.0.0.1. Nothing here reads the
workspace's params.yaml either: the tests own their params (TINY_PARAMS), so editing it changes no test but
the few that pin its defaults on purpose (workspace_params, marked `defaults`: CI runs them on its fresh clone,
and `python -m pytest` leaves them out, as it leaves out the `slow` ones; pyproject.toml's addopts).

    def test_something(project):                 # fresh copy, params committed, nothing run yet
        result = dvc(project, "repro")
        assert ran_stages(result) == {"validate", "download", "encode", "train", "sample", "export"}

    def test_other(reproduced_project):          # `dvc repro` already ran and its results are committed
        ...

Test modules import the helpers with `from conftest import dvc, git, ...` (pytest puts tests/ on sys.path).
"""

import hashlib
import http.server
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml

from nanogpt.config import Config, config_from_dict

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# What a pipeline run needs, relative to the project root. Generated files (dvc.lock, data/*.pt, out/*,
# metrics/*.json|tsv), caches and resume state are deliberately left out so every copy starts clean. So is
# params.yaml: the copy gets TINY_PARAMS, so that editing the workspace's params.yaml changes no test.
PROJECT_FILES = (
    "dvc.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "data/.gitignore",
    "out/.gitignore",
    "metrics/README.md",
    "vendor/vega/template.html",  # the plots page, with its scripts (.dvc/config's plots.html_template)
)
PROJECT_PACKAGES = ("stages", "nanogpt")

# The tests' params, complete: every key of nanogpt/config.py, as `section.name` (as `dvc exp run -S` names
# them). The tiny project's params.yaml is written from it and tests that build a Config use it (tiny_config),
# so the workspace's params.yaml is read only by the tests that pin its defaults on purpose (workspace_params).
# A key added to the config gets a line here, with the value the tests run with; until it does,
# test_config's test_tiny_params_hold_every_key_of_the_config fails naming it. The model trains in about a
# second on one CPU core; the keys that do not size it copy the defaults of when they were written.
TINY_PARAMS: dict[str, Any] = {
    # nothing listens on port 9: a test that downloads passes the loopback server's url and sha256
    "data.url": "http://127.0.0.1:9/input.txt",
    "data.sha256": "0" * 64,
    "data.timeout": 10,
    "data.retries": 0,
    "encode.val_fraction": 0.1,
    "encode.tokenizer": "char",
    "encode.vocab_size": 512,
    "model.block_size": 32,
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.dropout": 0.0,
    "model.gradient_checkpointing": False,
    "model.rope": False,
    "model.qk_norm": False,
    "model.mlp": "gelu",
    "model.tie_embeddings": True,
    "train.batch_size": 8,
    "train.learning_rate": 1e-3,
    "train.max_iters": 30,
    "train.warmup_iters": 5,
    "train.schedule": "cosine",
    "train.cooldown": 0.2,
    "train.min_lr": 0.1,
    "train.weight_decay": 0.1,
    "train.beta1": 0.9,
    "train.beta2": 0.99,
    "train.grad_clip": 1.0,
    "train.ema": 0.0,
    "train.optimizer": "muon",
    "train.muon_learning_rate": 0.02,
    "train.grad_accum_steps": 1,
    "train.eval_interval": 10,
    "train.eval_iters": 2,
    "train.resume_interval": 10,
    "train.device": "cpu",
    "train.dtype": "fp32",
    "train.compile": False,
    "train.compile_mode": "reduce-overhead",
    "train.seed": 1337,
    "train.tensorboard": False,
    "sample.prompt": "\n",
    "sample.num_tokens": 50,
    "sample.num_samples": 1,
    "sample.temperature": 1.0,
    "sample.top_k": None,
    "sample.top_p": None,
    "sample.seed": 1337,
    "sample.quantize": None,
    "sample.compile": False,
}

STAGES = ("validate", "download", "encode", "train", "sample", "export")
# the address-space cap of the stages that test_stages.py and test_runtime.py run capped: a regression fails an
# allocation instead of filling the machine
ADDRESS_SPACE = 8 << 30
DELETE = object()  # a set_params value that removes the key

_WORDS = (  # noqa: SIM905  a word list reads better as one string than as 100 quoted literals
    "the and to of a my i you that in is not with me it for be his your this but he have as thou so him "
    "will what thy all her no by do shall if are we thee our lord on good now love sir o king well would "
    "come more they how or let here was hath then there than when man one which make say night sweet death "
    "heart blood crown grace honour fair speak hear eyes heaven brother father queen gentle noble sword"
).split()
_SPEAKERS = (
    "ROMEO",
    "JULIET",
    "KING RICHARD",
    "QUEEN ELIZABETH",
    "FIRST CITIZEN",
    "MENENIUS",
    "NURSE",
    "GLOUCESTER",
    "LADY ANNE",
    "PETRUCHIO",
)


class Corpus(NamedTuple):
    data: bytes
    sha256: str


def make_corpus(size: int = 40_000, seed: int = 0) -> bytes:
    """A deterministic Shakespeare-like text of about `size` bytes: speakers, lines, punctuation (ASCII)."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        speech = [f"{rng.choice(_SPEAKERS)}:"]
        for _ in range(rng.randint(1, 4)):
            words = rng.choices(_WORDS, k=rng.randint(4, 10))
            if rng.random() < 0.3:
                words[rng.randrange(len(words) - 1)] += rng.choice(",;")
            speech.append(" ".join(words).capitalize() + rng.choice(".,!?;:"))
        paragraph = "\n".join(speech) + "\n\n"
        parts.append(paragraph)
        length += len(paragraph)
    return "".join(parts).encode("ascii")


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: on a busy machine several spin-wait for each other (the
    subprocesses get the same through OMP_NUM_THREADS in tool_env)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked `gpu` is skipped where there is no CUDA device: `pytest -m gpu` selects the whole GPU set
    on any machine and runs it where there is a GPU."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def cuda_devices() -> list[Any]:
    """Every CUDA device as a `gpu`-marked param for tests parametrized over devices; without one, `cuda:0`,
    which is then skipped."""
    return [pytest.param(f"cuda:{i}", marks=pytest.mark.gpu) for i in range(max(1, torch.cuda.device_count()))]


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    """The generated corpus (~40 KB) and its sha256, the same in every run."""
    data = make_corpus()
    return Corpus(data, hashlib.sha256(data).hexdigest())


class LoopbackServer:
    """An http.server on 127.0.0.1 (free port) in a daemon thread.

    Serves `files` (URL path -> bytes, editable while running; anything else is a 404) and appends every
    requested path to `requests`, so a test can check whether a stage really downloaded.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                owner.requests.append(self.path)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
                pass  # keep pytest's output clean

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="session")
def loopback_server(corpus: Corpus) -> Iterator[LoopbackServer]:
    """The running server, serving the corpus at /input.txt (shared by the whole session)."""
    with LoopbackServer({"/input.txt": corpus.data}) as server:
        yield server


@pytest.fixture(scope="session")
def http_server(loopback_server: LoopbackServer) -> str:
    """URL of the corpus on the loopback server."""
    return loopback_server.url("/input.txt")


def tool_env(project: Path) -> dict[str, str]:
    """Environment for dvc, git and the stages they run: no prompts, analytics, Studio or proxies, no user or
    system DVC config, DVC's site cache inside the project, and this interpreter first on PATH (stages run
    as `python -m stages.X`).

    GIT_* variables are dropped: under a git hook GIT_DIR/GIT_INDEX_FILE would point git at the real repo.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    private = project / ".dvc" / "tmp"  # git-ignored, and not part of the DVC workspace
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="1",
        DVC_SITE_CACHE_DIR=str(private / "site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(private / "no-global-config"),
        DVC_SYSTEM_CONFIG_DIR=str(private / "no-system-config"),
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_NOSYSTEM="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",  # stage logs arrive line by line, for tests that act on them
        OMP_NUM_THREADS="1",  # tiny models: more threads only contend on a small CI machine
        PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
    )
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    return env


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message includes the captured output, so a failing test shows why."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run(project: Path, *cmd: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in `project` with tool_env, capturing text output; raise CommandFailed if check and it fails."""
    result = subprocess.run(
        cmd, cwd=project, env=tool_env(project), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, cmd, result.stdout, result.stderr)
    return result


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`dvc *args` in `project` (with this interpreter's dvc), e.g. dvc(project, "exp", "run", "-S", "train.seed=1")."""
    return run(project, sys.executable, "-m", "dvc", *args, check=check)


def run_stage(project: Path, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m stages.<name> *args` in `project`, as dvc would run it (ten minutes at most)."""
    return run(project, sys.executable, "-m", f"stages.{name}", *args, check=check, timeout=600)


def git(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`git *args` in `project`."""
    return run(project, "git", *args, check=check)


def commit(project: Path, message: str) -> None:
    """Commit everything in the workspace, as a user does after `dvc repro` (dvc.lock, params, metrics)."""
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", message)


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr together (DVC logs to both, depending on level)."""
    return result.stdout + result.stderr


def ran_stages(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages whose command DVC ran (`Running stage 'x':`)."""
    return set(re.findall(r"Running stage '([\w@.-]+)'", output(result)))


def skipped_stages(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages DVC found unchanged (`Stage 'x' didn't change, skipping`)."""
    return set(re.findall(r"Stage '([\w@.-]+)' didn't change, skipping", output(result)))


def restored_stages(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages DVC restored from its run cache instead of running (`Stage 'x' is cached - skipping run`)."""
    return set(re.findall(r"Stage '([\w@.-]+)' is cached - skipping run", output(result)))


def read_params(path: Path) -> dict[str, Any]:
    """The params.yaml at `path`, parsed."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def nested(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted keys ({"train.seed": 1}) as params.yaml's sections ({"train": {"seed": 1}}), in their order."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return sections


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """Write dotted-key `params` (TINY_PARAMS with changes, say) as the params.yaml at `path`. Returns `path`."""
    path.write_text(yaml.safe_dump(nested(params), sort_keys=False), encoding="utf-8")
    return path


def tiny_config(overrides: dict[str, Any] | None = None) -> Config:
    """TINY_PARAMS with dotted-key `overrides`, validated as a stage validates params.yaml, for tests that call
    the package directly: `tiny_config({"model.n_layer": 1}).model`."""
    return config_from_dict(nested({**TINY_PARAMS, **(overrides or {})}))


_workspace_params_reads: list[str] = []  # the tests that called workspace_params, while they run


def workspace_params() -> Path:
    """The repository's own params.yaml. Only for the tests that pin its defaults on purpose (the documented
    defaults, the schema, configs/*.args), marked `defaults` (only_defaults_tests_read_the_workspace_params sees
    to it); every other test runs on TINY_PARAMS, so editing the workspace file changes nothing else."""
    _workspace_params_reads.append(os.environ.get("PYTEST_CURRENT_TEST", ""))
    return PROJECT_ROOT / "params.yaml"


@pytest.fixture(autouse=True)
def only_defaults_tests_read_the_workspace_params(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that reads the workspace's params.yaml without the `defaults` marker: after a `dvc exp run`
    (the README's CPU quick start, say) that file holds the user's values, and `python -m pytest`, which leaves
    the marked tests out, must still pass."""
    _workspace_params_reads.clear()
    yield
    if _workspace_params_reads and request.node.get_closest_marker("defaults") is None:
        pytest.fail("reads the workspace's params.yaml (workspace_params) but is not marked `defaults`")


def set_params(path: Path, overrides: dict[str, Any], new_keys: bool = False) -> None:
    """Rewrite the params.yaml at `path` with dotted-key overrides ({"train.max_iters": 30}; DELETE removes the
    key). A key must exist unless `new_keys` (for tests of a misspelt parameter)."""
    params = read_params(path)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if name not in params[section] and not new_keys:
            raise KeyError(f"{key} is not in {path}: a misspelt key, or one missing from TINY_PARAMS")
        if value is DELETE:
            del params[section][name]
        else:
            params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def make_project(
    dest: Path,
    url: str | None = None,
    sha256: str | None = None,
    overrides: dict[str, Any] | None = None,
    corpus: bytes | None = None,
) -> Path:
    """Copy the project's pipeline (code and dvc.yaml) into `dest` with TINY_PARAMS as its params.yaml, plus the
    corpus `url`/`sha256` (if given) and `overrides`, and commit it all as the first commit of a new git repository
    on branch main. With `corpus`, data/input.txt is already in place (as if downloaded; git-ignored), for tests
    that run stages directly. Returns `dest`."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    for name in PROJECT_PACKAGES:
        shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    source = {"data.url": url, "data.sha256": sha256} if url is not None else {}
    unknown = sorted(set(overrides or {}) - set(TINY_PARAMS))
    if unknown:
        raise KeyError(f"{', '.join(unknown)}: not in TINY_PARAMS (misspelt, or missing there)")
    write_params(dest / "params.yaml", {**TINY_PARAMS, **source, **(overrides or {})})
    if corpus is not None:
        (dest / "data" / "input.txt").write_bytes(corpus)
    git(dest, "init", "-q", "--initial-branch=main")
    for key, value in (("user.name", "Test"), ("user.email", "test@example.com"), ("commit.gpgsign", "false")):
        git(dest, "config", key, value)
    commit(dest, "tiny pipeline")
    return dest


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of the project at `src` (git history, DVC cache and outputs included). Returns `dest`."""
    # .dvc/tmp holds locks and DVC's site cache, both keyed to the source's path
    shutil.copytree(
        src, dest, symlinks=True, ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else []
    )
    return dest


def snapshot(project: Path, folders: tuple[str, ...] = ("data", "out", "metrics")) -> dict[str, bytes]:
    """Every file under `folders` of `project` (temporary files too), by path."""
    return {
        str(p.relative_to(project)): p.read_bytes()
        for folder in folders
        for p in sorted((project / folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(tmp_path: Path, http_server: str, corpus: Corpus) -> Path:
    """A fresh, committed copy of the pipeline with TINY_PARAMS (on the CPU), downloading from the loopback server;
    nothing has run yet (no dvc.lock)."""
    return make_project(tmp_path / "project", http_server, corpus.sha256)


@pytest.fixture(scope="session")
def _reproduced_template(tmp_path_factory: pytest.TempPathFactory, http_server: str, corpus: Corpus) -> Path:
    path = make_project(tmp_path_factory.mktemp("template") / "project", http_server, corpus.sha256)
    dvc(path, "repro")
    commit(path, "dvc repro")
    return path


@pytest.fixture
def reproduced_project(tmp_path: Path, _reproduced_template: Path) -> Path:
    """Like `project`, but `dvc repro` has run and its results (dvc.lock, metrics) are committed at HEAD, with
    the outputs in the workspace and DVC cache. A private copy of one session-wide run, so it is cheap."""
    return copy_project(_reproduced_template, tmp_path / "project")
