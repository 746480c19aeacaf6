"""nanogpt/runtime.py: which device a run gets, and how a CUDA that fails to start is reported (one line, never
torch's two-line warning); where torch.compile keeps its caches (one folder of the user's, outside every
workspace)."""

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ADDRESS_SPACE, PROJECT_ROOT
from nanogpt import runtime
from nanogpt.errors import UserError
from nanogpt.runtime import resolve_device


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NANOGPT_COMPILE_CACHE", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_compile_cache_is_in_the_users_cache_folder(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    assert runtime.compile_cache() == tmp_path / ".cache" / "nanogpt-dvc" / "compile"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.compile_cache() == tmp_path / "xdg" / "nanogpt-dvc" / "compile"
    clean_env.setenv("NANOGPT_COMPILE_CACHE", str(tmp_path / "mine"))
    assert runtime.compile_cache() == tmp_path / "mine"


def test_use_compile_cache_points_inductor_and_triton_there_unless_set(clean_env, tmp_path):
    clean_env.setenv("NANOGPT_COMPILE_CACHE", str(tmp_path / "c"))
    clean_env.setenv("TRITON_CACHE_DIR", str(tmp_path / "users-triton"))
    runtime.use_compile_cache()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "c" / "inductor"
    assert Path(os.environ["TRITON_CACHE_DIR"]) == tmp_path / "users-triton"  # the user's setting wins
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == tmp_path / "c" / "inductor"  # where inductor itself now writes


# torch's words when CUDA is installed but cannot start, here under an 8 GiB address-space limit on an H100
CUDA_OUT_OF_MEMORY = (
    "CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you run some cuda functions before "
    "calling NumCudaDevices() that might have already set an error? Error 2: out of memory (Triggered internally "
    "at /pytorch/c10/cuda/CUDAFunctions.cpp:109.)"
)


def _cuda_out_of_memory() -> None:
    warnings.warn(CUDA_OUT_OF_MEMORY, UserWarning, stacklevel=1)


def _a_warning_from_torchs_cpp_side() -> None:
    """A real torch call whose warning, like CUDA's, comes from C++ through torch's warning handler."""
    torch.ones(3).T  # noqa: B018  the deprecated 1-D transpose warns


@pytest.fixture(params=[_cuda_out_of_memory, _a_warning_from_torchs_cpp_side], ids=["cuda-oom-text", "torch-cpp"])
def cuda_fails_to_start(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """torch.cuda as it behaves where CUDA is installed but cannot start: the probe warns and finds no device.
    (A CPU machine cannot make real CUDA fail; the GPU set does it for real, test_cuda_under_a_memory_cap_....)"""
    warn: Callable[[], None] = request.param

    def is_available() -> bool:
        warn()
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's C++ warnings come once a process; the cases need them each time
    yield warn
    torch.set_warn_always(previous)


def test_cuda_that_fails_to_start_is_one_error_line_saying_why(cuda_fails_to_start, capsys) -> None:
    with warnings.catch_warnings(record=True) as escaped, pytest.raises(UserError) as info:
        warnings.simplefilter("always")
        resolve_device("cuda", setting="--device")

    message = str(info.value)
    assert message.startswith("--device is 'cuda' but CUDA failed to start (")
    assert message.endswith("): use auto or cpu")
    assert "\n" not in message and "Triggered internally" not in message and "CUDA initialization" not in message
    if cuda_fails_to_start is _cuda_out_of_memory:
        assert "Error 2: out of memory" in message
    assert escaped == [], "torch's warning reached the user"
    assert capsys.readouterr().err == ""


def test_auto_falls_back_to_the_cpu_with_one_warning_line(cuda_fails_to_start, capsys) -> None:
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        device = resolve_device("auto")

    assert device == torch.device("cpu")
    assert escaped == [], "torch's warning reached the user"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("warning: train.device is 'auto' and CUDA failed to start (")
    assert lines[0].endswith("): running on cpu")


def test_cpu_never_asks_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpu` must not start CUDA: a CPU run under a memory limit, or on a broken driver, stays quiet."""

    def no(*args: object) -> None:
        raise AssertionError("CUDA was probed")

    monkeypatch.setattr(torch.cuda, "is_available", no)
    monkeypatch.setattr(torch.cuda, "device_count", no)

    assert resolve_device("cpu") == torch.device("cpu")


# a child that resolves argv[1] under the address-space limit of test_stages.py's capped stages, and prints it
_CAPPED_RESOLVE = (
    f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE})); "
    "from nanogpt.errors import exit_on_user_error; from nanogpt.runtime import resolve_device; "
    "exit_on_user_error(lambda: print(resolve_device(sys.argv[1])))()"
)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("device", "status", "stdout", "stderr"),
    [
        ("auto", 0, "cpu\n", "warning: train.device is 'auto' and CUDA failed to start ("),
        ("cuda", 2, "", "error: train.device is 'cuda' but CUDA failed to start ("),
    ],
)
def test_cuda_under_a_memory_cap_is_one_line(device: str, status: int, stdout: str, stderr: str) -> None:
    """The real thing, on a GPU machine: CUDA cannot map its memory under the cap, and says so in one line."""
    proc = subprocess.run(
        [sys.executable, "-c", _CAPPED_RESOLVE, device], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )

    assert (proc.returncode, proc.stdout) == (status, stdout), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(stderr), proc.stderr
