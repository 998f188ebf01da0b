"""Shared fixtures: a real HTTP server on 127.0.0.1, a MovieLens-layout archive, temp dirs.

The MovieLens archive: tests that need one (parsing, validation, download, the data assets, the
webserver end-to-end and browser tests) ask for ``movielens_archive`` (or ``movielens_zip``, its path,
or ``movielens_server``, which serves it over loopback HTTP as ``/ml-latest-small.zip``). It is

* the shared GroupLens file ``../shared/data/movielens/ml-latest-small.zip`` when it is there, with
  MovieLens' own numbers (100,836 ratings, 610 users, 9,724 rated of 9,742 movies, "Toy Story (1995)");
* otherwise, or when ``FLEXMF_TEST_SHARED=0`` is set, a synthetic stand-in written once per session
  by ``flexmf_assets.datasets.synthetic.write_movielens_archive`` from the ``synthetic-100k`` preset
  (:data:`SYNTHETIC`): the same layout (``ml-latest-small/`` with ratings.csv, movies.csv, tags.csv,
  links.csv, README.txt; CRLF lines; ratings 0.5..5 in 0.5 steps), with the config's numbers
  (100,000 ratings, 610 users, 9,742 movies); what the config does not fix (movies rated, the first
  title, the size of movies.csv) is read from the written zip.

Tests assert the numbers of the archive actually served (:class:`MovieLensArchive`: sha256 and size are
computed here, never hard-coded), so a clone with nothing beside it runs every test; only the CUDA
tests (and tests/test_distributed.py without its .ci/services.sh stack) skip.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "movielens" / "ml-latest-small.zip"
#: the synthetic stand-in's generator config (a preset shaped like ml-latest-small)
SYNTHETIC = "synthetic-100k"
#: the head of a test flexmf.yaml whose default dataset `mine` is a csv at ``{url}`` (``str.format``
#: fills it; literal braces are doubled)
MINE_CSV = """\
default_dataset: mine
validation: {{min_rows: 100}}
datasets:
  mine:
    url: {url}
    format: csv
    columns: {{user_id: user_id, item_id: item_id, rating: rating, timestamp: timestamp}}
"""

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


@dataclass(frozen=True)
class MovieLensArchive:
    """The ml-latest-small archive this session serves, and what tests may assert about it."""

    path: Path
    real: bool  # the shared GroupLens file; False: the synthetic stand-in
    sha256: str  # of the file, computed at fixture time
    size: int  # bytes of the zip
    ratings: int  # data rows of ratings.csv
    users: int  # distinct userIds in ratings.csv
    rated_items: int  # distinct movieIds in ratings.csv
    movies: int  # data rows of movies.csv
    movies_csv_size: int  # bytes of ml-latest-small/movies.csv
    title_1: str  # the title of movieId 1


#: MovieLens' published numbers for ml-latest-small (asserted only when the real file is served)
ML_LATEST_SMALL = {"ratings": 100_836, "users": 610, "rated_items": 9_724, "movies": 9_742,
                   "movies_csv_size": 494_431, "title_1": "Toy Story (1995)"}


def use_shared() -> bool:
    """Whether the shared GroupLens file is used: present, and not switched off by FLEXMF_TEST_SHARED=0."""
    return os.environ.get("FLEXMF_TEST_SHARED", "1") != "0" and SHARED_ZIP.exists()


def _synthetic_numbers(path: Path) -> dict:
    """The stand-in's numbers: the generator config's, and the rest read from the zip (stdlib only)."""
    from flexmf_assets.datasets.synthetic import resolve_config

    config = resolve_config(SYNTHETIC)
    with zipfile.ZipFile(path) as zf:
        with zf.open("ml-latest-small/ratings.csv") as fh:
            rated = {row["movieId"] for row in csv.DictReader(io.TextIOWrapper(fh, "utf-8", newline=""))}
        with zf.open("ml-latest-small/movies.csv") as fh:
            first = next(csv.DictReader(io.TextIOWrapper(fh, "utf-8", newline="")))
        movies_csv_size = zf.getinfo("ml-latest-small/movies.csv").file_size
    assert first["movieId"] == "1"
    return {"ratings": config.n_ratings, "users": config.n_users, "rated_items": len(rated),
            "movies": config.n_items, "movies_csv_size": movies_csv_size, "title_1": first["title"]}


@pytest.fixture(scope="session")
def movielens_archive(tmp_path_factory) -> MovieLensArchive:
    """The shared ml-latest-small.zip, or a synthetic one in its layout (see the module docstring)."""
    if use_shared():
        path, numbers = SHARED_ZIP, ML_LATEST_SMALL
    else:
        from flexmf_assets.datasets.synthetic import write_movielens_archive

        path = write_movielens_archive(tmp_path_factory.mktemp("movielens") / "ml-latest-small.zip", SYNTHETIC)
        numbers = _synthetic_numbers(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return MovieLensArchive(path=path, real=path == SHARED_ZIP, sha256=sha, size=path.stat().st_size, **numbers)


@pytest.fixture(scope="session")
def movielens_zip(movielens_archive) -> Path:
    return movielens_archive.path


@pytest.fixture(scope="session")
def movielens_server(tmp_path_factory, movielens_archive):
    """Serves the archive as ``/ml-latest-small.zip`` (a GroupLens-like mirror) on loopback;
    ``.archive`` is its :class:`MovieLensArchive`."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copy(movielens_archive.path, root / "ml-latest-small.zip")
    server = LoopbackServer(root)
    server.archive = movielens_archive
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
