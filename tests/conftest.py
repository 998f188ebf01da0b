"""Shared fixtures: a real HTTP server on 127.0.0.1, the shared MovieLens archive, temp dirs."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "movielens" / "ml-latest-small.zip"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TQDM_DISABLE", "1")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


class LoopbackServer:
    """A real threaded HTTP server on 127.0.0.1 serving ``root``; ``url(name)`` gives a file's URL."""

    def __init__(self, root: Path, handler_cls=_QuietHandler):
        self.root = Path(root)
        handler = functools.partial(handler_cls, directory=str(self.root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_root(tmp_path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def http_server(http_root):
    server = LoopbackServer(http_root)
    yield server
    server.close()


@pytest.fixture(scope="session")
def movielens_zip() -> Path:
    if not SHARED_ZIP.exists():
        pytest.skip(f"{SHARED_ZIP} is not present")
    return SHARED_ZIP


@pytest.fixture(scope="session")
def movielens_server(tmp_path_factory, movielens_zip):
    """Serves ml-latest-small.zip as ``/ml-latest-small.zip`` (a GroupLens-like mirror) on loopback."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copy(movielens_zip, root / "ml-latest-small.zip")
    server = LoopbackServer(root)
    yield server
    server.close()


@pytest.fixture
def dagster_instance(tmp_path):
    """A real (SQLite) Dagster instance in a temporary DAGSTER_HOME."""
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


def failure_text(result) -> str:
    """The user-facing text of a failed Dagster run's first step failure (description + error)."""
    failure = next(e for e in result.all_events if e.is_step_failure)
    data = failure.step_failure_data
    parts = []
    if data.user_failure_data is not None and data.user_failure_data.description:
        parts.append(data.user_failure_data.description)
    error = data.error
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)
