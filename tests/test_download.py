"""Downloading the corpus from a loopback HTTP server: verified, retried when worth it, never half-written."""

import gzip
import hashlib
import http.server
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import tiny_config
from nanogpt import download as download_module
from nanogpt.config import DataConfig
from nanogpt.download import download
from nanogpt.errors import UserError

BODY = b"To be, or not to be, that is the question:\n" * 500
SHA = hashlib.sha256(BODY).hexdigest()
OLD = b"the previous corpus\n"


class Handler(http.server.BaseHTTPRequestHandler):
    """Each path is one behaviour; `hits` counts the requests per path."""

    hits: ClassVar[Counter[str]] = Counter()  # shared: http.server makes a handler per request

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        if self.path == "/ok.txt":
            self.reply(200, BODY)
        elif self.path == "/gzip.txt":
            self.reply(200, gzip.compress(BODY), {"Content-Encoding": "gzip"})
        elif self.path == "/flaky.txt":
            self.reply(500, b"busy") if self.hits[self.path] == 1 else self.reply(200, BODY)
        elif self.path == "/truncated.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 2])  # then the connection closes
        else:
            self.reply(404, b"not here")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Counter]]:
    """Base URL of a fresh loopback server and its per-path request counts."""
    handler = type("FreshHandler", (Handler,), {"hits": Counter()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", handler.hits
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """A destination that already holds an older file, which every failure must leave alone."""
    path = tmp_path / "data" / "input.txt"
    path.parent.mkdir()
    path.write_bytes(OLD)
    return path


def cfg(url: str, sha: str = SHA, timeout: float = 5.0, retries: int = 0) -> DataConfig:
    return tiny_config({"data.url": url, "data.sha256": sha, "data.timeout": timeout, "data.retries": retries}).data


def assert_untouched(dest: Path) -> None:
    assert dest.read_bytes() == OLD
    assert os.listdir(dest.parent) == [dest.name]  # no temporary file left behind


def test_download_writes_the_file_and_returns_its_size(server, tmp_path):
    url, hits = server
    path = tmp_path / "input.txt"

    size = download(cfg(f"{url}/ok.txt"), path)

    assert size == len(BODY)
    assert path.read_bytes() == BODY
    assert hits["/ok.txt"] == 1


def test_download_replaces_an_older_file(server, dest):
    url, _ = server

    download(cfg(f"{url}/ok.txt"), dest)

    assert dest.read_bytes() == BODY
    assert os.listdir(dest.parent) == [dest.name]


def test_compressed_response_is_stored_decompressed(server, tmp_path):
    # servers such as raw.githubusercontent.com gzip text; Content-Length then counts compressed bytes
    url, _ = server
    path = tmp_path / "input.txt"

    assert download(cfg(f"{url}/gzip.txt"), path) == len(BODY)
    assert path.read_bytes() == BODY


def test_sha_mismatch_writes_nothing(server, dest):
    url, hits = server

    with pytest.raises(UserError) as info:
        download(cfg(f"{url}/ok.txt", sha="0" * 64, retries=2), dest)

    assert "sha256" in str(info.value) and "0" * 64 in str(info.value)
    assert hits["/ok.txt"] == 1  # a wrong file is not worth another attempt
    assert_untouched(dest)


def test_404_is_reported_and_not_retried(server, dest):
    url, hits = server

    with pytest.raises(UserError) as info:
        download(cfg(f"{url}/nowhere.txt", retries=2), dest)

    assert "404" in str(info.value) and f"{url}/nowhere.txt" in str(info.value)
    assert hits["/nowhere.txt"] == 1
    assert_untouched(dest)


def test_server_error_is_retried(server, dest):
    url, hits = server

    size = download(cfg(f"{url}/flaky.txt", retries=2), dest)

    assert size == len(BODY)
    assert dest.read_bytes() == BODY
    assert hits["/flaky.txt"] == 2


def test_truncated_body_fails_after_the_retries_and_writes_nothing(server, dest):
    url, hits = server

    with pytest.raises(UserError) as info:
        download(cfg(f"{url}/truncated.txt", retries=1), dest)

    assert "cut off" in str(info.value) and "2 attempts" in str(info.value)
    assert hits["/truncated.txt"] == 2
    assert_untouched(dest)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_suggests_a_local_file(dest):
    with pytest.raises(UserError) as info:
        download(cfg(f"http://127.0.0.1:{closed_port()}/input.txt"), dest)

    assert "cannot reach" in str(info.value)
    assert "data.url=file://" in str(info.value)
    assert_untouched(dest)


def test_server_that_never_answers_times_out(dest):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever answers
        port = silent.getsockname()[1]

        with pytest.raises(UserError) as info:
            download(cfg(f"http://127.0.0.1:{port}/input.txt", timeout=0.5), dest)

    assert "within 0.5 s" in str(info.value)
    assert_untouched(dest)


def test_file_url_is_copied(tmp_path):
    source = tmp_path / "local copy.txt"
    source.write_bytes(BODY)
    path = tmp_path / "out" / "input.txt"

    size = download(cfg(source.as_uri()), path)

    assert size == len(BODY)
    assert path.read_bytes() == BODY


def test_missing_file_url_names_the_path(tmp_path, dest):
    source = tmp_path / "no such file.txt"

    with pytest.raises(UserError) as info:
        download(cfg(source.as_uri(), retries=2), dest)

    assert str(source) in str(info.value)
    assert_untouched(dest)


def test_file_url_with_the_wrong_sha_writes_nothing(tmp_path, dest):
    source = tmp_path / "other.txt"
    source.write_bytes(b"not the corpus")

    with pytest.raises(UserError, match="sha256"):
        download(cfg(source.as_uri()), dest)

    assert_untouched(dest)


def test_relative_file_url_shows_the_absolute_form(dest):
    with pytest.raises(UserError) as info:
        download(cfg("file://data/input.txt"), dest)

    assert "absolute path" in str(info.value) and "file:///" in str(info.value)
    assert_untouched(dest)


def test_file_url_of_a_directory_says_so(tmp_path, dest):
    with pytest.raises(UserError, match="is a directory"):
        download(cfg(tmp_path.as_uri()), dest)
    assert_untouched(dest)


def test_retry_waits_are_capped(server, dest, monkeypatch):
    """data.retries: 2000 must not mean waits of 2**1999 seconds."""
    waits: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    url, _ = server

    with pytest.raises(UserError):
        download(cfg(f"{url}/truncated.txt", retries=12), dest)

    assert len(waits) == 12 and max(waits) == download_module.MAX_WAIT
    assert_untouched(dest)
