"""Fetch the corpus over http(s) or from a file:// URL, verify its sha256, and write it atomically."""

import hashlib
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import requests

from nanogpt import files
from nanogpt.config import DataConfig
from nanogpt.errors import UserError
from nanogpt.progress import byte_progress

CHUNK = 1 << 16
MAX_WAIT = 30.0  # seconds between attempts at most, however many data.retries allows


class _Transient(Exception):
    """A failure worth another attempt (timeout, dropped connection, HTTP 5xx, truncated body)."""


def download(cfg: DataConfig, dest: Path | str) -> int:
    """Write the verified file at `cfg.url` to `dest` and return its size in bytes.

    Nothing is written unless every byte arrived and the sha256 matches; transient failures are retried
    `cfg.retries` times with exponential backoff.
    """
    for attempt in range(cfg.retries + 1):
        try:
            return _fetch_once(cfg, Path(dest))
        except _Transient as exc:
            if attempt == cfg.retries:
                raise UserError(f"{exc} (after {cfg.retries + 1} attempts); {_offline_hint()}") from None
            wait = min(2.0**attempt, MAX_WAIT)
            print(f"{exc}; retrying in {wait:.0f} s", flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _offline_hint() -> str:
    return "to work offline use a local copy: dvc exp run -S data.url=file:///path/to/input.txt"


def _fetch_once(cfg: DataConfig, dest: Path) -> int:
    digest = hashlib.sha256()
    size = 0
    with files.atomic_open(dest, "wb") as out:
        for chunk in _chunks(cfg):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if digest.hexdigest() != cfg.sha256.lower():
            raise UserError(
                f"sha256 of {cfg.url} is {digest.hexdigest()}, expected {cfg.sha256} (data.sha256): "
                "the file is not the expected corpus; nothing was written"
            )
    return size


def _chunks(cfg: DataConfig) -> Iterator[bytes]:
    if cfg.url.startswith("file://"):
        yield from _file_chunks(cfg.url)
    else:
        yield from _http_chunks(cfg)


def _file_chunks(url: str) -> Iterator[bytes]:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc and parsed.netloc != "localhost":  # file://data/input.txt reads as host "data"
        raise UserError(
            f"data.url={url} is not an absolute file:// URL: file:// URLs need an absolute path, "
            f"e.g. file:///path/to/{Path(parsed.path).name or 'input.txt'} (three slashes)"
        )
    path = Path(urllib.request.url2pathname(parsed.path))
    if path.is_dir():
        raise UserError(f"{path} is a directory (data.url={url}): point data.url at the text file")
    if not path.is_file():
        raise UserError(f"{path} not found (data.url={url}): point data.url at an existing file")
    with path.open("rb") as f, byte_progress(f"reading {path.name}", path.stat().st_size) as advance:
        while chunk := f.read(CHUNK):
            advance(len(chunk))
            yield chunk


def _http_chunks(cfg: DataConfig) -> Iterator[bytes]:
    host = urllib.parse.urlparse(cfg.url).netloc
    try:
        with requests.get(cfg.url, stream=True, timeout=cfg.timeout) as resp:
            if resp.status_code >= 500:
                raise _Transient(f"HTTP {resp.status_code} {resp.reason} from {cfg.url}")
            if resp.status_code >= 400:
                raise UserError(f"HTTP {resp.status_code} {resp.reason} for {cfg.url}: check data.url")
            expected = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
            on_wire = 0  # Content-Length counts bytes on the wire, which differ from the chunks when compressed
            with byte_progress(f"downloading {Path(cfg.url).name}", expected) as advance:
                for chunk in resp.iter_content(CHUNK):
                    advance(resp.raw.tell() - on_wire)
                    on_wire = resp.raw.tell()
                    yield chunk
            if expected is not None and on_wire != expected:
                raise _Transient(f"download of {cfg.url} was cut off at {on_wire} of {expected} bytes")
    except requests.exceptions.Timeout:
        raise _Transient(f"no answer from {host} within {cfg.timeout:g} s (data.timeout)") from None
    except requests.exceptions.ChunkedEncodingError:
        raise _Transient(f"download of {cfg.url} was cut off") from None
    except requests.exceptions.ConnectionError as exc:
        if "timed out" in str(exc):
            raise _Transient(f"no answer from {host} within {cfg.timeout:g} s (data.timeout)") from None
        raise _Transient(f"cannot reach {host}: the network or host is unreachable") from None
    except requests.exceptions.TooManyRedirects:
        raise UserError(f"{cfg.url} redirects in a loop (or more than 30 times): check data.url") from None
    except requests.exceptions.RequestException as exc:  # an invalid URL, an unsupported redirect, ...
        raise UserError(f"cannot download {cfg.url}: {exc}: check data.url") from None
