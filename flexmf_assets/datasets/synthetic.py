"""Seeded synthetic ratings with a planted biased-MF structure, shaped like MovieLens.

A rating is ``clip(round_to_step(mu + b_u + b_i + p_u . q_i + noise))`` with Gaussian biases,
factors and noise. Who rates what follows power laws: user ``u`` rates ``n_u`` items, with
``n_u - min_user_ratings`` drawn from a Zipf-like activity curve, and items are drawn by a
Zipf-like popularity curve. Among the drawn candidates a user keeps those with higher true scores
a little more often (``selection_strength``), as people rate what they like.

Everything is vectorised numpy (25M ratings in well under 3 GB). The true parameters come from
their own random stream, so :func:`planted_truth` recovers them without generating ratings, and
:meth:`SyntheticTruth.expected` gives the noise-free rating of any (user, item) pair: a model that
recovers the structure reaches an RMSE near :meth:`SyntheticTruth.noise_rmse`.

:func:`write_movielens_archive` writes a dataset as a zip in the ml-latest-small layout (``ratings.csv``,
``movies.csv``, ``tags.csv``, ``links.csv``, ``README.txt`` under one top folder), which the built-in
``ml-latest-small`` format parses: a stand-in for MovieLens where it cannot be downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from flexmf_assets.datasets.frames import ITEMS_SCHEMA, ParsedDataset
from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import ConfigBase, suggest

_EPOCH_2000 = 946_684_800  # 2000-01-01T00:00:00Z
_EPOCH_2021 = 1_609_459_200  # 2021-01-01T00:00:00Z
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SyntheticConfig(ConfigBase):
    """Size and structure of a synthetic dataset (ids are 1-based: users 1..n_users)."""

    n_users: int
    n_items: int
    n_ratings: int
    rank: int = 8
    global_mean: float = 3.5
    user_bias_sd: float = 0.4
    item_bias_sd: float = 0.5
    factor_sd: float = 0.4
    noise_sd: float = 0.5
    item_alpha: float = 0.9
    user_alpha: float = 0.8
    min_user_ratings: int = 20
    max_user_fraction: float = 0.4
    selection_strength: float = 1.0
    rating_low: float = 0.5
    rating_high: float = 5.0
    rating_step: float = 0.5
    seed: int = 42

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("n_users", "n_items", "n_ratings", "rank", "min_user_ratings"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{name}.{f}: must be >= 1, got {getattr(self, f)}")
        for f in ("user_bias_sd", "item_bias_sd", "factor_sd", "noise_sd", "item_alpha", "user_alpha",
                  "selection_strength"):
            if getattr(self, f) < 0:
                raise ConfigError(f"{name}.{f}: must be >= 0, got {getattr(self, f)}")
        if not 0 < self.max_user_fraction <= 1:
            raise ConfigError(f"{name}.max_user_fraction: must be in (0, 1], got {self.max_user_fraction}")
        if self.rating_low >= self.rating_high:
            raise ConfigError(f"{name}.rating_low: must be below rating_high ({self.rating_high}), "
                              f"got {self.rating_low}")
        if self.rating_step <= 0:
            raise ConfigError(f"{name}.rating_step: must be > 0, got {self.rating_step}")
        if self.n_users * self.min_user_ratings > self.n_ratings:
            raise ConfigError(f"{name}.n_ratings: {self.n_ratings} is fewer than n_users * min_user_ratings "
                              f"= {self.n_users * self.min_user_ratings}")
        if self.min_user_ratings > self.user_cap:
            raise ConfigError(f"{name}.min_user_ratings: {self.min_user_ratings} exceeds "
                              f"max_user_fraction * n_items = {self.user_cap}")
        if self.n_users * self.user_cap < self.n_ratings:
            raise ConfigError(f"{name}.n_ratings: {self.n_ratings} cannot fit in {self.n_users} users "
                              f"rating at most {self.user_cap} items each")

    @property
    def user_cap(self) -> int:
        """The most ratings one user may have."""
        return max(1, int(self.max_user_fraction * self.n_items))


#: the named synthetic datasets (``generate("synthetic-1m")``), shaped like the MovieLens releases
SYNTHETIC_DATASETS: dict[str, SyntheticConfig] = {
    # like ml-latest-small: 100,836 ratings, 610 users, 9,724 rated of 9,742 movies
    "synthetic-100k": SyntheticConfig(n_users=610, n_items=9_742, n_ratings=100_000),
    # like ml-1m: 1,000,209 ratings, 6,040 users, 3,706 movies
    "synthetic-1m": SyntheticConfig(n_users=6_040, n_items=3_706, n_ratings=1_000_000),
    # like ml-10m: 10,000,054 ratings, 69,878 users, 10,677 movies
    "synthetic-10m": SyntheticConfig(n_users=69_878, n_items=10_677, n_ratings=10_000_000),
    # like ml-25m: 25,000,095 ratings, 162,541 users, 59,047 movies
    "synthetic-25m": SyntheticConfig(n_users=162_541, n_items=59_047, n_ratings=25_000_000),
}


def resolve_config(config_or_preset: SyntheticConfig | str, seed: int | None = None) -> SyntheticConfig:
    """A config from a preset name (or the config itself), with ``seed`` applied when given."""
    if isinstance(config_or_preset, str):
        names = list(SYNTHETIC_DATASETS)
        if config_or_preset not in names:
            raise ConfigError(f"synthetic preset {config_or_preset!r} is unknown{suggest(config_or_preset, names)}; "
                              f"presets: {', '.join(names)}")
        config = SYNTHETIC_DATASETS[config_or_preset]
    else:
        config = config_or_preset
    return config if seed is None else replace(config, seed=seed)


def synthetic_fingerprint(preset: str) -> str:
    """A stable sha256 for a synthetic preset: its generator parameters (no download involved)."""
    params = asdict(resolve_config(preset))
    blob = json.dumps({"preset": preset, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class SyntheticTruth:
    """The planted parameters; index ``u - 1`` holds user ``u`` (ids are 1-based)."""

    config: SyntheticConfig
    global_mean: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray

    def expected(self, user_ids: np.ndarray, item_ids: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """Noise-free rating of each (user, item) pair (float64), clipped to the scale by default."""
        u = np.asarray(user_ids, dtype=np.int64) - 1
        i = np.asarray(item_ids, dtype=np.int64) - 1
        out = np.empty(len(u), dtype=np.float64)
        self._expected0(u, i, out)
        if clip:
            np.clip(out, self.config.rating_low, self.config.rating_high, out=out)
        return out

    def _expected0(self, u: np.ndarray, i: np.ndarray, out: np.ndarray) -> None:
        """Unclipped expectation for 0-based indices, written into ``out`` chunk by chunk."""
        step = 1 << 16  # rows of factors gathered at once (keeps temporaries small)
        for s in range(0, len(u), step):
            uu, ii = u[s:s + step], i[s:s + step]
            dot = np.einsum("ij,ij->i", np.take(self.user_factors, uu, axis=0),
                            np.take(self.item_factors, ii, axis=0))
            out[s:s + step] = self.global_mean + self.user_bias[uu] + self.item_bias[ii] + dot

    def rmse(self, ratings: pl.DataFrame) -> float:
        """RMSE of the noise-free (clipped) expectation against observed ratings: a model's floor."""
        exp = self.expected(ratings["user_id"].to_numpy(), ratings["item_id"].to_numpy())
        return float(np.sqrt(np.mean((ratings["rating"].to_numpy().astype(np.float64) - exp) ** 2)))

    def noise_rmse(self) -> float:
        """Approximate RMSE floor from the noise and the rounding to ``rating_step``."""
        return math.sqrt(self.config.noise_sd ** 2 + self.config.rating_step ** 2 / 12)


def _rngs(config: SyntheticConfig) -> tuple[np.random.Generator, np.random.Generator]:
    params, sample = np.random.SeedSequence(config.seed).spawn(2)
    return np.random.default_rng(params), np.random.default_rng(sample)


def _truth(config: SyntheticConfig, rng: np.random.Generator) -> SyntheticTruth:
    return SyntheticTruth(
        config=config,
        global_mean=config.global_mean,
        user_bias=rng.normal(0.0, config.user_bias_sd, config.n_users),
        item_bias=rng.normal(0.0, config.item_bias_sd, config.n_items),
        user_factors=rng.normal(0.0, config.factor_sd, (config.n_users, config.rank)),
        item_factors=rng.normal(0.0, config.factor_sd, (config.n_items, config.rank)),
    )


def planted_truth(config_or_preset: SyntheticConfig | str, *, seed: int | None = None) -> SyntheticTruth:
    """The true biases and factors behind :func:`generate` for the same config and seed."""
    config = resolve_config(config_or_preset, seed)
    return _truth(config, _rngs(config)[0])


def _power_law(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``rank**-alpha`` assigned to a random permutation of ``n`` ids, normalised."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    w = w[rng.permutation(n)]
    return w / w.sum()


def _allocate(total: int, weights: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights``, each at most ``cap``."""
    counts = np.zeros(len(weights), dtype=np.int64)
    free = np.ones(len(weights), dtype=bool)
    remaining = total
    while remaining > 0 and free.any():
        w = np.where(free, weights, 0.0)
        share = w / w.sum() * remaining
        add = np.floor(share).astype(np.int64)
        short = remaining - int(add.sum())
        if short > 0:  # largest remainders get one more
            frac = np.where(free, share - add, -1.0)
            add[np.argpartition(-frac, short - 1)[:short]] += 1
        add = np.minimum(add, cap - counts)
        counts += add
        remaining -= int(add.sum())
        free &= counts < cap
    return counts


class _AliasSampler:
    """Walker/Vose alias table: O(1) draws from a discrete distribution (exact, no binary search)."""

    def __init__(self, p: np.ndarray) -> None:
        n = len(p)
        scaled = p * n / p.sum()
        prob = np.ones(n)
        alias = np.arange(n, dtype=np.int64)
        small = [int(i) for i in np.flatnonzero(scaled < 1.0)]
        large = [int(i) for i in np.flatnonzero(scaled >= 1.0)]
        sc = scaled.tolist()
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s] = sc[s]
            alias[s] = g
            sc[g] = sc[g] + sc[s] - 1.0
            (small if sc[g] < 1.0 else large).append(g)
        self.prob, self.alias, self.n = prob, alias, n

    def draw(self, size: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(size) * self.n
        idx = u.astype(np.int64)
        np.minimum(idx, self.n - 1, out=idx)
        u -= idx
        return np.where(u < self.prob[idx], idx, self.alias[idx])


def _unique(keys: np.ndarray) -> np.ndarray:
    """Sorted unique values (a plain sort beats numpy's hash-based unique on int64 keys)."""
    keys = np.sort(keys)
    if len(keys) == 0:
        return keys
    mask = np.empty(len(keys), dtype=bool)
    mask[0] = True
    np.not_equal(keys[1:], keys[:-1], out=mask[1:])
    return keys[mask]


def _candidates(config: SyntheticConfig, target: np.ndarray, sampler: _AliasSampler,
                rng: np.random.Generator) -> np.ndarray:
    """Unique keys ``user * n_items + item`` with at least ``target[u]`` per user (when reachable).

    Items are drawn with replacement by popularity and deduplicated; users still short draw again,
    scaling their next draw by the yield of new items they saw in the previous round.
    """
    n_items = config.n_items
    users = np.arange(config.n_users, dtype=np.int64)
    draws = target.copy()
    keys = np.empty(0, dtype=np.int64)
    have = np.zeros(config.n_users, dtype=np.int64)
    for _round in range(50):
        need = target - have
        who = need > 0
        if not who.any():
            break
        n_draw = np.where(who, draws, 0)
        u = np.repeat(users, n_draw)
        new = u * n_items + sampler.draw(len(u), rng)
        del u
        if len(keys):
            stale = who[keys // n_items]
            merged = _unique(np.concatenate([keys[stale], new]))
            keys = np.concatenate([keys[~stale], merged])
        else:
            keys = _unique(new)
        del new
        before = have
        have = np.bincount(keys // n_items, minlength=config.n_users)
        gained = np.maximum(have - before, 1) / np.maximum(n_draw, 1)
        draws = np.ceil(1.3 * (target - have) / gained).astype(np.int64) + 4
        draws = np.minimum(draws, 50 * n_items)
    keys.sort()  # users short in an early round were appended at the end
    return keys


def _ratings(config: SyntheticConfig, truth: SyntheticTruth, rng: np.random.Generator) -> pl.DataFrame:
    n_users, n_items = config.n_users, config.n_items
    activity = _power_law(n_users, config.user_alpha, rng)
    cap = np.full(n_users, config.user_cap - config.min_user_ratings, dtype=np.int64)
    extra = _allocate(config.n_ratings - n_users * config.min_user_ratings, activity, cap)
    n_u = extra + config.min_user_ratings
    popularity = _power_law(n_items, config.item_alpha, rng)
    oversample = 1.25 if config.selection_strength > 0 else 1.0
    target = np.minimum(np.ceil(n_u * oversample).astype(np.int64), config.user_cap)
    keys = _candidates(config, target, _AliasSampler(popularity), rng)
    n = len(keys)
    users = (keys // n_items).astype(np.int32)
    items = (keys - users.astype(np.int64) * n_items).astype(np.int32)
    del keys
    expected = np.empty(n, dtype=np.float32)
    truth._expected0(users, items, expected)
    # keep n_u per user: Gumbel top-k on selection_strength * standardised score. One float64 key
    # sorts by user, then by descending priority (np.lexsort is several times slower); built in place.
    key = rng.gumbel(size=n)
    if config.selection_strength > 0:
        sd = float(expected.std(dtype=np.float64)) or 1.0
        for s in range(0, n, _CHUNK):
            key[s:s + _CHUNK] += (config.selection_strength / sd) * (expected[s:s + _CHUNK] - config.global_mean)
    np.exp(key, out=key)
    key += 1.0
    np.reciprocal(key, out=key)
    key *= 0.999
    key += users
    order = np.argsort(key)
    del key
    limit = np.cumsum(np.bincount(users, minlength=n_users)) - np.bincount(users, minlength=n_users) + n_u
    keep = np.empty(n, dtype=bool)
    for s in range(0, n, _CHUNK):
        o = order[s:s + _CHUNK]
        keep[o] = np.arange(s, s + len(o)) < limit[users[o]]
    del order
    users, items, expected = users[keep], items[keep], expected[keep]
    del keep
    m = len(users)
    step = config.rating_step
    rating = np.empty(m, dtype=np.float32)
    ts = np.empty(m, dtype=np.int64)
    # each user is active from a random start for an exponential span (mean ~half a year)
    start = rng.uniform(_EPOCH_2000, _EPOCH_2021 - 86_400, n_users)
    span = np.minimum(rng.exponential(180 * 86_400, n_users), _EPOCH_2021 - 1 - start)
    for s in range(0, m, _CHUNK):
        e = min(m, s + _CHUNK)
        noisy = expected[s:e] + rng.normal(0.0, config.noise_sd, e - s)
        rating[s:e] = np.clip(np.round(noisy / step) * step, config.rating_low, config.rating_high)
        u = users[s:e]
        ts[s:e] = start[u] + rng.random(e - s) * span[u]
    del expected
    frame = pl.DataFrame({"user_id": users, "item_id": items})
    del users, items
    return frame.select((pl.col("user_id").cast(pl.Int64) + 1), (pl.col("item_id").cast(pl.Int64) + 1)).with_columns(
        rating=pl.Series(rating), timestamp=pl.Series(ts),
    )


def generate(config_or_preset: SyntheticConfig | str, *, seed: int | None = None) -> ParsedDataset:
    """Generate a dataset (ratings sorted by user then item; all items listed in ``items``).

    Same config and seed give an identical frame. See :func:`planted_truth` for the parameters.
    """
    config = resolve_config(config_or_preset, seed)
    params_rng, sample_rng = _rngs(config)
    truth = _truth(config, params_rng)
    ratings = _ratings(config, truth, sample_rng)
    ids = np.arange(1, config.n_items + 1, dtype=np.int64)
    items = pl.DataFrame(
        {"item_id": ids, "title": [f"Item {i}" for i in ids], "genres": [""] * config.n_items},
        schema=ITEMS_SCHEMA,
    )
    return ParsedDataset(ratings, items)


#: MovieLens' genre vocabulary (movies.csv); a movie gets 1-3 of them, or ``(no genres listed)``
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_GENRE_WEIGHTS = (1450, 1060, 500, 530, 3760, 1200, 440, 4360, 780, 90, 980, 160, 330, 570, 1600, 980, 1900, 380, 170)
_TAGS = ("atmospheric", "funny", "thought-provoking", "twist ending", "dark comedy", "visually appealing",
         "classic", "Highly quotable", "superhero", "surreal", "based on a book", "great soundtrack")
_ZIP_TIME = (2000, 1, 1, 0, 0, 0)  # fixed member times: same config, same bytes (with the same zlib)


def _movies(config: SyntheticConfig, rng: np.random.Generator) -> pl.DataFrame:
    """movies.csv: ``Movie 17 (1995)`` titles (every tenth ``Movie 20, The (1987)``, quoted as in MovieLens)
    and alphabetically ordered pipe-separated genres."""
    ids = np.arange(1, config.n_items + 1, dtype=np.int64)
    years = rng.integers(1920, 2019, config.n_items)
    weights = np.asarray(_GENRE_WEIGHTS, dtype=np.float64) / sum(_GENRE_WEIGHTS)
    counts = rng.choice([0, 1, 2, 3], size=config.n_items, p=[0.005, 0.4, 0.35, 0.245])
    titles, genres = [], []
    for i, year, k in zip(ids.tolist(), years.tolist(), counts.tolist()):
        titles.append(f"Movie {i}, The ({year})" if i % 10 == 0 else f"Movie {i} ({year})")
        picked = sorted(rng.choice(len(GENRES), size=k, replace=False, p=weights).tolist()) if k else []
        genres.append("|".join(GENRES[g] for g in picked) or "(no genres listed)")
    return pl.DataFrame({"movieId": ids, "title": titles, "genres": genres})


def _tags(ratings: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """tags.csv: one tag on about one rating in 27 (as in ml-latest-small), a few minutes after it."""
    rows = np.sort(rng.choice(ratings.height, size=ratings.height // 27, replace=False))
    picked = ratings[rows]
    return pl.DataFrame({
        "userId": picked["user_id"], "movieId": picked["item_id"],
        "tag": [_TAGS[t] for t in rng.integers(0, len(_TAGS), len(rows)).tolist()],
        "timestamp": picked["timestamp"] + rng.integers(1, 600, len(rows)),
    })


def _readme(folder: str, config: SyntheticConfig, ratings: pl.DataFrame, n_tags: int) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items())
    return f"""Summary
=======

This dataset ({folder}) is SYNTHETIC: it was written by flexmf_assets.datasets.synthetic.write_movielens_archive
in the layout of MovieLens ml-latest-small. It contains {ratings.height} ratings and {n_tags} tag applications
across {config.n_items} movies, by {ratings["user_id"].n_unique()} users. No rating comes from a real person.

Ratings follow a planted biased matrix-factorization model:
SyntheticConfig({fields})

Files
=====

ratings.csv  userId,movieId,rating,timestamp, sorted by userId then movieId
             (ratings {config.rating_low}..{config.rating_high} in steps of {config.rating_step}; seconds since 1970 UTC)
movies.csv   movieId,title,genres (titles "Movie <id> (<year>)"; genres pipe-separated)
tags.csv     userId,movieId,tag,timestamp
links.csv    movieId,imdbId,tmdbId (made-up identifiers)
"""


def write_movielens_archive(path: str | os.PathLike[str], config_or_preset: SyntheticConfig | str = "synthetic-100k",
                            *, seed: int | None = None, folder: str | None = None) -> Path:
    """Write :func:`generate`'s dataset as a zip in the MovieLens ml-latest-small layout; returns the path.

    The zip holds ``<folder>/`` (default: the file name without ``.zip``) with ``ratings.csv``
    (``userId,movieId,rating,timestamp``, exactly :func:`generate`'s ratings), ``movies.csv``
    (``movieId,title,genres``, every item), ``tags.csv``, ``links.csv`` and ``README.txt``; CSV lines end
    in CRLF as in the GroupLens file. The same config, seed and folder give the same bytes (with the same
    zlib). Written to a temporary file beside ``path`` and moved into place (``os.replace``).
    """
    config = resolve_config(config_or_preset, seed)
    path = Path(path)
    folder = folder or (path.name[:-4] if path.name.endswith(".zip") else path.name)
    ratings = generate(config).ratings
    meta_rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(3)[2])  # not generate()'s streams
    movies = _movies(config, meta_rng)
    tags = _tags(ratings, meta_rng)
    links = pl.DataFrame({"movieId": movies["movieId"],
                          "imdbId": [f"{i:07d}" for i in (movies["movieId"] + 110_000).to_list()],
                          "tmdbId": movies["movieId"] + 800})
    ratings_csv = ratings.rename({"user_id": "userId", "item_id": "movieId"})
    members = (("movies.csv", movies), ("ratings.csv", ratings_csv), ("tags.csv", tags),
               ("README.txt", _readme(folder, config, ratings, tags.height)), ("links.csv", links))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            top = zipfile.ZipInfo(f"{folder}/", _ZIP_TIME)
            top.external_attr = (0o40755 << 16) | 0x10  # a directory, as in the GroupLens file
            zf.writestr(top, b"")
            for name, content in members:
                info = zipfile.ZipInfo(f"{folder}/{name}", _ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
                big = isinstance(content, pl.DataFrame) and content.height * 40 > zipfile.ZIP64_LIMIT
                with zf.open(info, "w", force_zip64=big) as out:
                    if isinstance(content, str):
                        out.write(content.encode("utf-8"))
                    else:
                        content.write_csv(out, line_terminator="\r\n")
        tmp.chmod(0o644)  # mkstemp made it private; the archive is plain data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["SyntheticConfig", "SyntheticTruth", "SYNTHETIC_DATASETS", "GENRES", "generate", "planted_truth", "resolve_config",
           "synthetic_fingerprint", "write_movielens_archive"]
