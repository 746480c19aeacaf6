"""Atomic writes and safe reads: a kill at any moment leaves the old file or the new one, never half of one."""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from nanogpt.errors import UserError


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception (or a kill) the temporary file is removed or left under a `.tmp` name, and
    `path` keeps its previous content. A write that fails (a full disk, a parent that is a file) is a UserError
    `cannot write PATH: REASON`; any other exception raised inside the block passes through as it is. The file
    gets the mode a plain `open` would give it (0644 under the usual umask 022), not the 0600 of a temporary file.
    """
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    raw = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
    try:
        with _write_errors(path):
            os.fchmod(fd, 0o666 & ~_umask())
        f = _RecordingFile(raw)
        with _write_errors(path, f):
            yield cast(IO[Any], f)  # a proxy with the file's methods
        with _write_errors(path):
            raw.flush()
            os.fsync(raw.fileno())
            raw.close()
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            raw.close()  # after a failed write the buffered bytes cannot be flushed either
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _RecordingFile:
    """A file whose failed writes are remembered, so that atomic_open tells them from the block's own errors
    (torch.save raises its own RuntimeError after a write of ours failed)."""

    def __init__(self, file: IO[Any]) -> None:
        self.file = file
        self.failure: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.failure = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@contextlib.contextmanager
def _write_errors(path: Path, file: _RecordingFile | None = None) -> Iterator[None]:
    """An OSError of the file system inside the block (or one that `file`'s writes raised, wherever it surfaces)
    becomes the UserError `cannot write PATH: REASON`."""
    try:
        yield
    except Exception as exc:
        failure = exc if file is None else _caused_by(exc, file.failure)
        if not isinstance(failure, OSError):
            raise
        raise UserError(f"cannot write {path}: {failure.strerror or failure}") from None


def _caused_by(exc: BaseException, failure: OSError | None) -> OSError | None:
    """`failure` when `exc` is it or was raised while handling it (as torch.save's RuntimeError is), else None."""
    seen: BaseException | None = exc
    while seen is not None and failure is not None:
        if seen is failure:
            return failure
        seen = seen.__context__
    return None


def copy_file(source: Path | str, path: Path | str, link: bool = False) -> None:
    """Put a copy of `source` at `path` atomically; `link`: a hard link where the file system allows one (no
    copy of the bytes), else a copy. A failure is the UserError `cannot write PATH: REASON`."""
    source, path = Path(source), Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            if link:
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
            else:
                shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # rename() is a no-op when both names link the same file


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
        with _write_errors(self.path):
            self._file = self._opening.__enter__()
        return self

    def write(self, text: str) -> None:
        with _write_errors(self.path):
            self._file.write(text)

    def flush(self) -> None:
        with _write_errors(self.path):
            self._file.flush()

    def __exit__(self, *exc_info: Any) -> bool | None:
        if exc_info[0] is not None:  # the block failed: the temporary file goes, the block's exception goes on
            try:
                return self._opening.__exit__(*exc_info)
            except OSError:  # closing it failed as its write did (the rest of the buffer): not the news
                raise exc_info[1] from None
        with _write_errors(self.path):
            return self._opening.__exit__(None, None, None)


class BackgroundWrites:
    """Writes that run one after another on a thread of their own while the caller goes on (training keeps the
    GPU busy while a checkpoint goes to disk). Each write is atomic as before; what a write needs must be handed
    over as values the caller no longer changes (tensors on the CPU, copies of lists). `wait()` returns when
    every write submitted so far is on disk and raises the first one's error, a UserError for a failed write."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanogpt-writes")
        self._pending: list[Any] = []

    def submit(self, write: Any, *args: Any) -> None:
        """Queue `write(*args)` behind the earlier writes; an earlier write's error is raised now."""
        self._raise_finished()
        self._pending.append(self._pool.submit(write, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _raise_finished(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()
