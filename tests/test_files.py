"""Atomic writes leave the old file or the new one; safe loads turn bad files into one-line errors."""

import json
import os
import pickle
import stat
import subprocess

import pytest
import torch

from nanogpt import files
from nanogpt.errors import UserError


class Boom(Exception):
    pass


def test_atomic_write_replaces_the_content(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old", encoding="utf-8")

    files.write_text(path, "new")

    assert path.read_text(encoding="utf-8") == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_json_files_hold_one_value_a_line(tmp_path):
    """Metrics and vocabularies are committed: one value a line, indented, makes a diff show the changed keys."""
    path = tmp_path / "metrics.json"

    files.write_json(path, {"best_val_loss": 1.5, "steps": [10, 20]})

    assert path.read_text(encoding="utf-8") == '{\n  "best_val_loss": 1.5,\n  "steps": [\n    10,\n    20\n  ]\n}\n'


def test_atomic_write_fsyncs_the_temporary_file_before_renaming_it(tmp_path, monkeypatch):
    """Without the fsync a crash after the rename can leave an empty or partial file under the final name."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        stat = os.fstat(fd)  # which file the descriptor is (its inode) and how much of it is written
        events.append(("fsync", stat.st_ino, stat.st_size))
        real_fsync(fd)

    def recording_replace(src, dst) -> None:
        events.append(("replace", os.stat(src).st_ino, str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "out.txt"

    files.write_text(path, "new")

    assert [e[0] for e in events] == ["fsync", "replace"]
    (_, synced, size), (_, renamed, dst) = events
    assert synced == renamed == path.stat().st_ino  # the temporary file, synced, then renamed over the path
    assert dst == str(path) and size == len("new")  # synced whole, after the content was flushed
    assert path.read_text(encoding="utf-8") == "new"


def test_atomic_write_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"

    files.write_json(path, {"x": 1})

    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 1}


def test_an_exception_while_writing_keeps_the_previous_file_and_no_temporaries(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")

    with pytest.raises(Boom), files.atomic_open(path, "wb") as f:
        f.write(b"half of the new")
        raise Boom

    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_exception_while_writing_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom), files.atomic_open(tmp_path / "out.bin") as f:
        f.write(b"partial")
        raise Boom

    assert os.listdir(tmp_path) == []


def test_torch_save_and_load_round_trip(tmp_path):
    path = tmp_path / "state.pt"
    obj = {"w": torch.arange(6.0).view(2, 3), "step": 3, "name": "x", "rows": [(1, 0.5)]}

    files.torch_save(obj, path)
    loaded = files.torch_load(path, "state")

    assert torch.equal(loaded["w"], obj["w"])
    assert loaded["step"] == 3 and loaded["name"] == "x"


def assert_user_error_names(path, what: str) -> str:
    with pytest.raises(UserError) as info:
        files.torch_load(path, what)
    message = str(info.value)
    assert str(path) in message and what in message
    assert "\n" not in message
    # no pickle traceback chained to the message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return message


def test_truncated_file_is_a_user_error_naming_the_path(tmp_path):
    path = tmp_path / "state.pt"
    files.torch_save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    assert "corrupt" in assert_user_error_names(path, "resume state")


def test_random_bytes_are_a_user_error_naming_the_path(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(
        torch.randint(256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )

    assert "corrupt" in assert_user_error_names(path, "checkpoint")


def test_missing_file_is_a_user_error_naming_the_path(tmp_path):
    assert "not found" in assert_user_error_names(tmp_path / "nowhere.pt", "checkpoint")


class Exploit:
    """Unpickling this calls open(path, "w"): arbitrary code a weights-only load must not run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": Exploit(str(marker))}, path, pickle_module=pickle)

    assert_user_error_names(path, "checkpoint")
    assert not marker.exists()


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.txt", "hello")
        os.umask(0o077)
        files.write_text(tmp_path / "b.txt", "hello")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_loading_a_directory_says_so(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        files.torch_load(tmp_path, "checkpoint")


def test_a_corrupt_file_never_suggests_unsafe_loading(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")

    with pytest.raises(UserError) as info:
        files.torch_load(path, "checkpoint")

    assert "weights_only" not in str(info.value) and "corrupt" in str(info.value)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs holding `old.bin` (a previous output), skipped where this process may not mount one."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        (folder / "old.bin").write_bytes(b"previous")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def assert_cannot_write(path, write) -> None:
    """`write()` fails with the one-line `cannot write PATH: No space left on device`, no traceback chained."""
    with pytest.raises(UserError) as info:
        write()
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert info.value.__suppress_context__ and info.value.__cause__ is None


@pytest.mark.parametrize(
    "write",
    [
        lambda path: files.torch_save({"w": torch.zeros(100_000)}, path),  # 400 KB of tensor data
        lambda path: files.write_text(path, "x" * 200_000),
        lambda path: files.write_json(path, ["x" * 200_000]),
    ],
    ids=["torch_save", "write_text", "write_json"],
)
def test_a_full_disk_is_one_line_and_the_old_file_stays(full_disk, write):
    path = full_disk / "old.bin"

    assert_cannot_write(path, lambda: write(path))

    assert path.read_bytes() == b"previous"
    assert os.listdir(full_disk) == ["old.bin"]  # no temporary file left behind


def test_a_full_disk_while_copying_is_one_line(full_disk, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 200_000)
    path = full_disk / "old.bin"

    assert_cannot_write(path, lambda: files.copy_file(source, path))  # another file system: no hard link

    assert path.read_bytes() == b"previous" and os.listdir(full_disk) == ["old.bin"]


def test_a_parent_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    path = tmp_path / "out" / "ckpt.pt"

    with pytest.raises(UserError) as info:
        files.torch_save({"w": torch.zeros(3)}, path)

    assert str(info.value) in (f"cannot write {path}: Not a directory", f"cannot write {path}: File exists")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_an_error_of_the_block_itself_is_not_called_a_write_failure(tmp_path):
    """A download's connection error is an OSError too: only the file's own writes are reported as `cannot write`."""
    with pytest.raises(ConnectionError), files.atomic_open(tmp_path / "out.bin") as f:
        f.write(b"partial")
        raise ConnectionError("connection reset")

    assert os.listdir(tmp_path) == []


def test_background_writes_land_in_order_and_wait_returns_when_they_are_on_disk(tmp_path):
    writes = files.BackgroundWrites()
    for i in range(20):
        writes.submit(files.write_text, tmp_path / "m.tsv", f"version {i}\n")
    writes.wait()
    assert (tmp_path / "m.tsv").read_text() == "version 19\n"


def test_a_failed_background_write_is_one_line_when_the_caller_waits(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    writes = files.BackgroundWrites()
    writes.submit(files.write_text, tmp_path / "file" / "m.tsv", "x")
    with pytest.raises(UserError, match=r"cannot write .*m\.tsv"):
        writes.wait()
    writes.wait()  # reported once: nothing is pending now
    writes.submit(files.write_text, tmp_path / "ok.tsv", "y")  # and the writer still writes
    writes.wait()
    assert (tmp_path / "ok.tsv").read_text() == "y"
