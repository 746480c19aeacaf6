"""Atomic writes and safe reads: a kill at any moment leaves the old file or the new one, never half of one."""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nanogpt.errors import UserError


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception (or a kill) the temporary file is removed or left under a `.tmp` name, and
    `path` keeps its previous content. The file gets the mode a plain `open` would give it (0644 under the
    usual umask 022), not the 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(path: Path | str, what: str) -> None:
    """Fail now, before the work, where writing `path` with atomic_open would fail after it: `path` is a folder,
    or its folder cannot be created or written (read-only, not ours). Creates the folder, as atomic_open would."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {what} {path} ({exc.strerror}): make {path.parent} a writable folder") from None


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def torch_save(obj: Any, path: Path | str) -> None:
    import torch  # here, not at the top: the download stage writes no tensors and starts faster without torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def torch_load(path: Path | str, what: str) -> Any:
    """Load a file written by torch_save with weights_only=True (no pickle of arbitrary objects).

    A missing, truncated or foreign file raises a UserError that names the file and `what` it should be.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give the path of the file")
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for truncated or foreign files
        # torch's own message suggests weights_only=False, which would run code from the file: never pass it on
        raise UserError(
            f"{what} {path} is corrupt or not a file this project wrote (torch could not read it as plain tensors "
            "and numbers): write it again with the stage that makes it"
        ) from None


class AtomicTextFile:
    """A text file written piece by piece, as a stage produces it, into a temporary file beside `path` that
    replaces `path` when the `with` block ends without an exception (atomic_open). A write that fails (a full
    disk, a size limit) raises UserError `cannot write PATH: REASON` then and there; `path` keeps its old content."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._opening = atomic_open(self.path, "w")

    def __enter__(self) -> "AtomicTextFile":
        with self._as_user_error():
            self._file = self._opening.__enter__()
        return self

    def write(self, text: str) -> None:
        with self._as_user_error():
            self._file.write(text)

    def flush(self) -> None:
        with self._as_user_error():
            self._file.flush()

    def __exit__(self, *exc_info: Any) -> bool | None:
        if exc_info[0] is not None:  # the block failed: the temporary file goes, the block's exception goes on
            try:
                return self._opening.__exit__(*exc_info)
            except OSError:  # closing it failed as its write did (the rest of the buffer): not the news
                raise exc_info[1] from None
        with self._as_user_error():
            return self._opening.__exit__(None, None, None)

    @contextlib.contextmanager
    def _as_user_error(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None
