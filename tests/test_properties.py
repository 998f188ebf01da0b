"""Property-based tests (hypothesis): parsers, splitter, negative samplers, top-N metrics.

Examples are few (``max_examples`` 25 to 40) and small, so the file runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmf_assets.datasets.catalog import ARCHIVE_FORMATS
from flexmf_assets.datasets.parsing import parse_ratings_file
from flexmf_assets.datasets.split import SplitConfig, split_ratings
from flexmf_assets.errors import ParseError
from flexmf_assets.evaluation.topn import topn_metrics
from flexmf_assets.flexmf.sampling import PositiveSet, make_sampler

FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LAYOUT = ARCHIVE_FORMATS["ml-latest-small"]
HEADER = "userId,movieId,rating,timestamp"

# --------------------------------------------------------------------------- parsers

rows_st = st.lists(
    st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 10), st.integers(0, 2**34)),
    min_size=0, max_size=40,
)


def write(tmp_path: Path, lines: list[str], crlf: bool = False) -> Path:
    path = tmp_path / "ratings.csv"
    path.write_bytes(("\r\n" if crlf else "\n").join([HEADER, *lines, ""]).encode())
    return path


@FEW
@given(rows=rows_st, crlf=st.booleans())
def test_valid_rows_round_trip(tmp_path, rows, crlf):
    lines = [f"{u},{i},{r / 2},{t}" for u, i, r, t in rows]
    df = parse_ratings_file(write(tmp_path, lines, crlf), LAYOUT)
    assert df.schema == {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64}
    assert df.rows() == [(u, i, r / 2, t) for u, i, r, t in rows]  # halves are exact in float32


BAD_VALUES = {
    "rating": (2, "abc", "rating 'abc' is not a number"),
    "user": (0, "u17", "userId 'u17' is not an integer"),
    "item": (1, "1.5", "movieId '1.5' is not an integer"),
    "timestamp": (3, "yesterday", "timestamp 'yesterday' is not an integer"),
}


@FEW
@given(rows=rows_st.filter(bool), data=st.data())
def test_one_invalid_row_is_named_by_its_line(tmp_path, rows, data):
    lines = [f"{u},{i},{r / 2},{t}" for u, i, r, t in rows]
    at = data.draw(st.integers(0, len(lines) - 1), label="bad row")
    kind = data.draw(st.sampled_from([*BAD_VALUES, "too few", "too many"]), label="kind")
    fields = lines[at].split(",")
    if kind == "too few":
        fields = fields[:3]
        expected = "expected 4 fields separated by ',', found 3"
    elif kind == "too many":
        fields = [*fields, "9"]
        expected = "expected 4 fields separated by ',', found 5"
    else:
        col, value, expected = BAD_VALUES[kind]
        fields[col] = value
    lines[at] = ",".join(fields)
    with pytest.raises(ParseError) as err:
        parse_ratings_file(write(tmp_path, lines), LAYOUT, name="r.csv")
    message = str(err.value)
    assert message.startswith(f"r.csv line {at + 2}: ")  # the header is line 1
    assert expected in message and "\n" not in message


# --------------------------------------------------------------------------- splitter


@st.composite
def ratings_frames(draw) -> pl.DataFrame:
    n_users = draw(st.integers(3, 12))
    n_items = draw(st.integers(6, 15))
    rows = []
    for u in range(n_users):
        items = draw(st.lists(st.integers(0, n_items - 1), min_size=4, max_size=n_items, unique=True))
        rows += [(u, i, float(draw(st.integers(1, 5))), draw(st.integers(0, 1000))) for i in items]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float32,
                                      "timestamp": pl.Int64}, orient="row").with_row_index("row")


PROTOCOLS = [
    {"protocol": "random"},
    {"protocol": "random", "test_fraction": 0.5, "validation_fraction": 0.0},
    {"protocol": "user_holdout", "holdout_n": 1},
    {"protocol": "user_holdout", "holdout_fraction": 0.3},
    {"protocol": "temporal", "cutoff": 500},
    {"protocol": "temporal", "last_n": 2},
]


@settings(max_examples=40, deadline=None)
@given(ratings=ratings_frames(), protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 2**31))
def test_split_is_disjoint_complete_and_seeded(ratings, protocol, seed):
    if protocol.get("cutoff") is not None:
        ts = ratings["timestamp"]
        if ts.min() >= 500 or ts.max() < 500:  # the cutoff must leave both sides non-empty
            return
    config = SplitConfig.from_dict({**protocol, "seed": seed})
    result = split_ratings(ratings, config)
    parts = [result.train["row"], result.validation["row"], result.test["row"]]
    ids = pl.concat(parts)
    assert ids.n_unique() == ids.len() == ratings.height  # disjoint and complete
    assert set(ids.to_list()) == set(ratings["row"].to_list())
    again = split_ratings(ratings, config)
    for a, b in zip(parts, (again.train["row"], again.validation["row"], again.test["row"])):
        assert a.to_list() == b.to_list()  # seeded: the same seed gives the same split
    if protocol["protocol"] != "random":  # the per-user protocols leave every user a training row
        if "cutoff" not in protocol:
            assert set(result.train["user_id"].to_list()) == set(ratings["user_id"].to_list())


# --------------------------------------------------------------------------- negative samplers


@settings(max_examples=30, deadline=None)
@given(n_users=st.integers(1, 20), n_items=st.integers(2, 30), density=st.floats(0.05, 0.95),
       strategy=st.sampled_from(["uniform", "popular", "misranked"]), count=st.integers(1, 5),
       dense=st.booleans(), seed=st.integers(0, 2**31))
def test_sampled_negatives_are_never_positives(n_users, n_items, density, strategy, count, dense, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_users, n_items, generator=g) < density
    mask[:, 0] = True  # every user has a positive (the batch is drawn from positives)
    users, items = mask.nonzero(as_tuple=True)
    positives = PositiveSet(users, items, n_items, dense_limit=(1 << 20) if dense else 0)
    sampler = make_sampler(strategy, positives, items, candidates=4)
    table = torch.randn(n_users, n_items, generator=g)
    rows, inv = torch.unique(users, return_inverse=True)  # the engine's pooled scorer
    out = sampler.sample(users, count, pool_scores=lambda pool: (table[rows][:, pool], inv), generator=g)
    assert out.items.shape == out.valid.shape == (users.numel(), count)
    assert ((out.items >= 0) & (out.items < n_items)).all()
    is_positive = mask[users.unsqueeze(1), out.items]
    assert not (is_positive & out.valid).any()


# --------------------------------------------------------------------------- top-N metrics


@st.composite
def recs_and_truth(draw):
    n_users, n_items = draw(st.integers(1, 8)), draw(st.integers(1, 25))
    recs, test = [], []
    for u in range(n_users):
        ranked = draw(st.permutations(range(n_items)))[: draw(st.integers(0, n_items))]
        recs += [(u, i, r) for r, i in enumerate(ranked, start=1)]
        test += [(u, i) for i in draw(st.lists(st.integers(0, n_items - 1), max_size=6))]
    test.append((draw(st.integers(0, n_users + 2)), 0))  # at least one test row; maybe an unknown user
    recs_df = pl.DataFrame(recs, schema={"user_id": pl.Int64, "item_id": pl.Int64, "rank": pl.Int64}, orient="row")
    test_df = pl.DataFrame(test, schema={"user_id": pl.Int64, "item_id": pl.Int64}, orient="row")
    return recs_df, test_df


@settings(max_examples=40, deadline=None)
@given(data=recs_and_truth(), discount=st.sampled_from(["log2", "lenskit"]))
def test_metrics_are_bounded_and_recall_hit_grow_with_k(data, discount):
    recs, test = data
    ks = (1, 3, 5, 10)
    result = topn_metrics(recs, test, ks=ks, discount=discount)
    assert result.per_user.height == test["user_id"].n_unique()
    for name, value in result.means.items():
        assert 0.0 <= value <= 1.0 + 1e-9, name
    for col in result.per_user.columns:
        if "@" in col:
            assert result.per_user[col].min() >= 0.0 and result.per_user[col].max() <= 1.0 + 1e-9, col
    for metric in ("recall", "hit"):
        for a, b in zip(ks, ks[1:]):
            assert (result.per_user[f"{metric}@{a}"] <= result.per_user[f"{metric}@{b}"] + 1e-12).all()
