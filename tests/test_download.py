"""fetch(): real HTTP on 127.0.0.1 with well- and misbehaving servers, file:// sources, the cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import socket
import struct
import threading
from pathlib import Path

import pytest

from conftest import LoopbackServer
from flexmf_assets.datasets.archive import find_member, safe_extract
from flexmf_assets.datasets.download import fetch, redact_url
from flexmf_assets.files import sha256_file
from flexmf_assets.errors import ChecksumError, DownloadError

FAST = {"backoff": 0.01, "timeout": 5.0}


class ScriptedHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files under ``directory`` with ETag/Last-Modified/Range/304; each request consumes
    one action of ``script`` ('ok' when exhausted): ok, 404, 429, 500, 503, reset, short, stall."""

    script: list[str] = []
    log: list[dict] = []
    release = threading.Event()

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def do_GET(self):  # noqa: N802 - stdlib name
        type(self).log.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        action = type(self).script.pop(0) if type(self).script else "ok"
        path = Path(self.translate_path(self.path))
        if action.isdigit():
            self.send_error(int(action))
            return
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if action == "ok" and self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if action == "ok" and rng and self.headers.get("If-Range") == etag:
            start = int(rng.split("=")[1].rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", self.date_time_string(1_700_000_000))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if action == "ok":
            self.wfile.write(body[start:])
        elif action in ("reset", "short"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if action == "reset":  # RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif action == "stall":
            self.wfile.flush()
            type(self).release.wait(5)
            self.close_connection = True


@pytest.fixture(scope="module")
def _scripted_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    handler = type("H", (ScriptedHandler,), {"script": [], "log": [], "release": threading.Event()})
    server = LoopbackServer(root, handler)
    yield server, handler, root
    handler.release.set()
    server.close()


@pytest.fixture
def scripted(_scripted_server):
    """(server, handler class, payload path): the scripted server, reset, serving ``data.zip``."""
    server, handler, root = _scripted_server
    handler.script, handler.log, handler.release = [], [], threading.Event()
    payload = root / "data.zip"
    payload.write_bytes(random.Random(7).randbytes(300_000))
    yield server, handler, payload
    handler.release.set()


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith((".part", ".tmp")))


def test_download_then_cache_hit_makes_no_request(scripted, tmp_path):
    server, handler, payload = scripted
    sha = sha256_file(payload)
    info = fetch(server.url("data.zip"), tmp_path / "cache", name="demo", sha256=sha, **FAST)
    assert info.path == tmp_path / "cache" / "demo" / "data.zip"
    assert info.path.read_bytes() == payload.read_bytes()
    assert (info.sha256, info.size, info.cached) == (sha, 300_000, False)
    assert info.etag and info.last_modified
    sidecar = json.loads((info.path.parent / "data.zip.json").read_text())
    assert sidecar["sha256"] == sha and sidecar["size"] == 300_000 and sidecar["etag"] == info.etag
    again = fetch(server.url("data.zip"), tmp_path / "cache", name="demo", sha256=sha, **FAST)
    assert again.cached and again.sha256 == sha and again.etag == info.etag
    assert len(handler.log) == 1
    assert _leftovers(tmp_path / "cache") == []


def test_conditional_get_304_reuses_and_change_redownloads(scripted, tmp_path):
    server, handler, payload = scripted
    first = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    assert not first.cached and "if-none-match" not in handler.log[0]
    second = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    assert second.cached and second.sha256 == first.sha256
    assert handler.log[1]["if-none-match"] == first.etag
    assert handler.log[1]["if-modified-since"] == first.last_modified
    payload.write_bytes(b"new content")
    third = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    assert not third.cached and third.path.read_bytes() == b"new content"
    assert third.sha256 == hashlib.sha256(b"new content").hexdigest() and third.etag != first.etag
    assert len(handler.log) == 3


def test_damaged_cache_is_refetched_after_304(scripted, tmp_path):
    server, handler, payload = scripted
    info = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    info.path.write_bytes(b"corrupted on disk")
    again = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    assert not again.cached and again.path.read_bytes() == payload.read_bytes()
    assert len(handler.log) == 3 and "if-none-match" not in handler.log[2]


def test_progress_is_throttled_and_ends_at_total(http_root, http_server, tmp_path):
    (http_root / "big.zip").write_bytes(bytes(3 * 2**20 + 5))
    calls: list[tuple[int, int | None]] = []
    fetch(http_server.url("big.zip"), tmp_path, name="big",
          progress=lambda done, total: calls.append((done, total)), **FAST)
    assert calls[-1] == (3 * 2**20 + 5, 3 * 2**20 + 5)
    assert [c[0] for c in calls] == sorted({c[0] for c in calls})
    assert 3 <= len(calls) <= 8  # ~ one per MiB, not one per 256 KiB chunk


@pytest.mark.parametrize("builtin", [False, True])
def test_checksum_mismatch_names_values_and_leaves_no_file(scripted, tmp_path, builtin):
    server, _, payload = scripted
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        fetch(server.url("data.zip"), tmp_path, name="ml-demo", sha256=wrong, builtin=builtin, **FAST)
    msg = str(err.value)
    assert "\n" not in msg and "ml-demo" in msg and wrong in msg and sha256_file(payload) in msg
    assert not (tmp_path / "ml-demo" / "data.zip").exists() and _leftovers(tmp_path) == []


def test_size_mismatch_is_a_checksum_error(scripted, tmp_path):
    server, _, _ = scripted
    with pytest.raises(ChecksumError, match=r"expected 1234 bytes, server announces 300000"):
        fetch(server.url("data.zip"), tmp_path, name="demo", size=1234, **FAST)
    assert list((tmp_path / "demo").iterdir()) == []


def test_good_cached_file_survives_failed_redownloads(scripted, tmp_path):
    server, handler, payload = scripted
    good = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    good_bytes = good.path.read_bytes()
    sidecar = (good.path.parent / "data.zip.json").read_text()
    payload.write_bytes(b"x" * 100_000)  # the remote changed (new ETag) ...
    handler.script[:] = ["short"]  # ... and the transfer breaks off
    with pytest.raises(DownloadError, match="truncated"):
        fetch(server.url("data.zip"), tmp_path, name="demo", retries=0, **FAST)
    with pytest.raises(ChecksumError):  # ... or delivers something unexpected
        fetch(server.url("data.zip"), tmp_path, name="demo", sha256="a" * 64, **FAST)
    assert good.path.read_bytes() == good_bytes
    assert (good.path.parent / "data.zip.json").read_text() == sidecar
    assert _leftovers(tmp_path) == []


def test_404_fails_at_once(scripted, tmp_path):
    server, handler, _ = scripted
    with pytest.raises(DownloadError) as err:
        fetch(server.url("missing.zip"), tmp_path, name="demo", **FAST)
    assert str(err.value) == f"HTTP 404 Not Found for {server.url('missing.zip')}"
    assert len(handler.log) == 1


@pytest.mark.parametrize("failures", [["500", "500"], ["429", "503"]])
def test_transient_errors_are_retried(scripted, tmp_path, failures):
    server, handler, payload = scripted
    handler.script[:] = list(failures)
    info = fetch(server.url("data.zip"), tmp_path, name="demo", sha256=sha256_file(payload), **FAST)
    assert info.path.read_bytes() == payload.read_bytes()
    assert len(handler.log) == 3


def test_retries_exhausted_names_attempts_and_cause(scripted, tmp_path):
    server, handler, _ = scripted
    handler.script[:] = ["500"] * 10
    with pytest.raises(DownloadError) as err:
        fetch(server.url("data.zip"), tmp_path, name="demo", retries=2, **FAST)
    assert "after 3 attempts" in str(err.value) and "HTTP 500" in str(err.value)
    assert server.url("data.zip") in str(err.value)
    assert len(handler.log) == 3


def test_reset_mid_body_resumes_with_range(scripted, tmp_path):
    server, handler, payload = scripted
    handler.script[:] = ["reset"]
    info = fetch(server.url("data.zip"), tmp_path, name="demo", sha256=sha256_file(payload), **FAST)
    assert info.path.read_bytes() == payload.read_bytes()
    assert len(handler.log) == 2
    # the bytes before the break (whole 64 KiB reads) are kept: the retry asks for the rest
    assert handler.log[1]["if-range"] == info.etag
    start = int(handler.log[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 150_000 and start % 65536 == 0


def test_resume_restarts_when_the_remote_changed(scripted, tmp_path, monkeypatch):
    server, handler, payload = scripted
    handler.script[:] = ["short"]
    original = payload.read_bytes()
    # the server's If-Range check fails once the file changes, so it answers 200 with the full body
    real_do_get = handler.do_GET

    def change_then_get(self):
        if len(handler.log) == 1:
            payload.write_bytes(original[::-1])
        real_do_get(self)

    monkeypatch.setattr(handler, "do_GET", change_then_get)
    info = fetch(server.url("data.zip"), tmp_path, name="demo", **FAST)
    assert info.path.read_bytes() == original[::-1] and info.size == len(original)
    assert "range" in handler.log[1] and len(handler.log) == 2


def test_stalled_server_times_out(scripted, tmp_path):
    server, handler, _ = scripted
    handler.script[:] = ["stall", "stall"]
    with pytest.raises(DownloadError) as err:
        fetch(server.url("data.zip"), tmp_path, name="demo", timeout=0.5, retries=1, backoff=0.01)
    assert "after 2 attempts" in str(err.value) and "timed out" in str(err.value).lower()
    assert _leftovers(tmp_path) == []


def test_content_length_larger_than_body_is_truncation(scripted, tmp_path):
    server, handler, _ = scripted
    handler.script[:] = ["short", "short"]
    with pytest.raises(DownloadError, match=r"after 2 attempts.*truncated at \d+ of 300000 bytes"):
        fetch(server.url("data.zip"), tmp_path, name="demo", retries=1, **FAST)
    assert not (tmp_path / "demo" / "data.zip").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("url", ["ftp://example.org/a.zip", "s3://bucket/a.zip", "data:,hello",
                                 "relative/path.zip", "", "http:///no-host.zip"])
def test_unsupported_urls_are_refused(tmp_path, url):
    with pytest.raises(DownloadError, match=r"allowed schemes: http://, https://, file://"):
        fetch(url, tmp_path, name="demo")


def test_bad_dataset_name_is_refused(tmp_path):
    with pytest.raises(DownloadError, match="cannot be used as a cache folder"):
        fetch("http://127.0.0.1:9/a.zip", tmp_path, name="../escape")


def test_file_url_is_copied_and_reused(tmp_path):
    src = tmp_path / "src" / "ratings archive.zip"
    src.parent.mkdir()
    src.write_bytes(b"local bytes" * 1000)
    url = src.as_uri()
    info = fetch(url, tmp_path / "cache", name="local", allowed_roots=[tmp_path / "src"])
    assert info.path == tmp_path / "cache" / "local" / "ratings archive.zip"
    assert info.path.read_bytes() == src.read_bytes() and not info.cached
    assert fetch(url, tmp_path / "cache", name="local").cached  # unchanged source: no copy
    assert fetch(url, tmp_path / "cache", name="local", sha256=info.sha256).cached
    src.write_bytes(b"changed")
    changed = fetch(url, tmp_path / "cache", name="local")
    assert not changed.cached and changed.path.read_bytes() == b"changed"
    with pytest.raises(ChecksumError, match="expected 1 bytes, got 7"):
        fetch(url, tmp_path / "cache2", name="local", size=1)


def test_file_url_escape_and_missing_file(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    secret = tmp_path / "secret.zip"
    secret.write_bytes(b"not yours")
    with pytest.raises(DownloadError, match="outside the allowed roots"):
        fetch(f"file://{root}/../secret.zip", tmp_path / "cache", name="x", allowed_roots=[root])
    (root / "link.zip").symlink_to(secret)
    with pytest.raises(DownloadError, match="outside the allowed roots"):
        fetch((root / "link.zip").as_uri(), tmp_path / "cache", name="x", allowed_roots=[root])
    with pytest.raises(DownloadError, match=f"no such file {root / 'nope.zip'}"):
        fetch((root / "nope.zip").as_uri(), tmp_path / "cache", name="x", allowed_roots=[root])
    with pytest.raises(DownloadError, match="must name a local path"):
        fetch("file://otherhost/etc/passwd", tmp_path / "cache", name="x")
    assert not (tmp_path / "cache" / "x" / "secret.zip").exists()


def test_redact_url():
    assert redact_url("https://bob:hunter2@host:8443/a/b.zip?x=1") == "https://***@host:8443/a/b.zip?x=1"
    assert redact_url("https://token@host/a.zip") == "https://***@host/a.zip"
    assert redact_url("https://host/a.zip?token=abc&v=2") == "https://host/a.zip?token=***&v=2"
    assert redact_url("file:///tmp/a.zip") == "file:///tmp/a.zip"


def test_credentials_never_appear(scripted, tmp_path):
    server, handler, payload = scripted
    url = f"http://bob:s3cretpw@127.0.0.1:{server.port}/data.zip"
    info = fetch(url, tmp_path, name="demo", **FAST)
    assert info.url == f"http://***@127.0.0.1:{server.port}/data.zip"
    assert handler.log[0]["authorization"].startswith("Basic ")  # the credentials were used
    assert "s3cretpw" not in (info.path.parent / "data.zip.json").read_text()
    for bad in (url.replace("data.zip", "missing.zip"), "ftp://bob:s3cretpw@127.0.0.1/x.zip",
                f"http://bob:s3cretpw@127.0.0.1:{_closed_port()}/x.zip"):
        with pytest.raises(DownloadError) as err:
            fetch(bad, tmp_path, name="other", retries=1, backoff=0.01, timeout=2)
        assert "s3cretpw" not in str(err.value) and "***@" in str(err.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_movielens_archive_downloads_and_extracts(movielens_server, tmp_path):
    archive = movielens_server.archive  # the shared file (982,873 bytes) or its synthetic stand-in
    info = fetch(movielens_server.url("ml-latest-small.zip"), tmp_path / "cache", name="ml-latest-small",
                 sha256=archive.sha256, builtin=True)
    assert info.sha256 == archive.sha256 and info.size == archive.size and not info.cached
    files = safe_extract(info.path, tmp_path / "extracted", archive_sha256=info.sha256)
    assert {f.name for f in files} >= {"ratings.csv", "movies.csv", "tags.csv", "links.csv"}
    ratings = find_member(tmp_path / "extracted", "ratings.csv")
    with open(ratings, encoding="utf-8") as fh:
        assert fh.readline().strip() == "userId,movieId,rating,timestamp"
        assert sum(1 for _ in fh) == archive.ratings
    assert find_member(tmp_path / "extracted", "movies.csv").stat().st_size == archive.movies_csv_size
    assert fetch(movielens_server.url("ml-latest-small.zip"), tmp_path / "cache", name="ml-latest-small",
                 sha256=archive.sha256, builtin=True).cached


# --------------------------------------------------------------------------- the size cap


class EndlessHandler(http.server.SimpleHTTPRequestHandler):
    """200 with neither Content-Length nor checksum, then zeros until the client hangs up."""

    sent: list[int] = []

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def do_GET(self):  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.end_headers()
        chunk, sent = bytes(64 * 1024), 0
        try:
            while sent < 2**31:  # a safety stop for the test itself: 2 GiB
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client closed the connection
            pass
        finally:
            type(self).sent.append(sent)
        self.close_connection = True


def test_endless_download_stops_at_the_cap_and_leaves_nothing(tmp_path):
    import time

    handler = type("Endless", (EndlessHandler,), {"sent": []})
    server = LoopbackServer(tmp_path, handler)
    cap = 5 * 2**20
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError) as err:
            fetch(server.url("forever.zip"), tmp_path / "cache", name="demo", max_bytes=cap, **FAST)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    msg = str(err.value)
    assert msg == (f"demo: {server.url('forever.zip')} sent more than {cap} bytes; the download size cap "
                   f"(download.max_bytes) is {cap} bytes; nothing was kept (raise download.max_bytes "
                   f"if the file really is that large)")
    assert elapsed < 30
    assert list((tmp_path / "cache" / "demo").iterdir()) == []  # no partial file, no target
    assert handler.sent and cap <= handler.sent[0] < 2**31  # the client hung up, the server stopped


def test_announced_declared_or_local_size_over_the_cap(scripted, tmp_path):
    server, handler, payload = scripted  # data.zip: 300,000 bytes with Content-Length
    with pytest.raises(DownloadError, match=r"announces 300000 bytes; the download size cap "
                                            r"\(download.max_bytes\) is 100000 bytes"):
        fetch(server.url("data.zip"), tmp_path, name="demo", max_bytes=100_000, **FAST)
    assert len(handler.log) == 1 and list((tmp_path / "demo").iterdir()) == []
    with pytest.raises(DownloadError, match=r"is declared as 300000 bytes; the download size cap"):
        fetch(server.url("data.zip"), tmp_path, name="demo", size=300_000, max_bytes=100_000, **FAST)
    assert len(handler.log) == 1  # refused before any request
    with pytest.raises(DownloadError, match=r"is 300000 bytes; the download size cap"):
        fetch(payload.as_uri(), tmp_path, name="local", max_bytes=100_000)
    assert not (tmp_path / "local").exists()
    info = fetch(server.url("data.zip"), tmp_path, name="demo", max_bytes=300_000, **FAST)
    assert info.size == 300_000  # exactly the cap is allowed


@pytest.mark.parametrize("bad", [0, -1, True, "4GB", 1.5, None])
def test_max_bytes_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(DownloadError, match=r"^demo: download.max_bytes must be a positive integer, got "):
        fetch("http://127.0.0.1:9/a.zip", tmp_path, name="demo", max_bytes=bad)


@pytest.mark.parametrize(("value", "error"), [
    ("1048576", None), ("null", None), ("0", "got the integer 0"), ("-5", "got the integer -5"),
    ("'4GB'", "got the string '4GB'"), ("true", "got the boolean true"),
    ("1.5e+9", "got the number 1500000000.0"),
])
def test_project_download_max_bytes(tmp_path, value, error):
    from flexmf_assets.errors import ConfigError
    from flexmf_assets.project import load_project

    cfg = tmp_path / "flexmf.yaml"
    cfg.write_text(f"download:\n  max_bytes: {value}\n")
    if error is None:
        assert load_project(cfg, env={}).download["max_bytes"] == (None if value == "null" else int(value))
        return
    with pytest.raises(ConfigError) as err:
        load_project(cfg, env={})
    assert str(err.value) == f"flexmf.yaml download.max_bytes: expected a positive integer (bytes) or null, {error}"
