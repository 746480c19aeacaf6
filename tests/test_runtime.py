"""Where torch.compile keeps its caches: one folder of the user's, outside every workspace."""

import os
from pathlib import Path

import pytest

from nanogpt import runtime


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
