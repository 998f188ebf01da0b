"""All-user top-N: the fused CPU kernel (flexmf/_kernels_topn.c via topn.native_topn) against the torch
path (scorer.recommend_in_batches with topn.topk_rows), and the tie rule both follow.

Embeddings with small integer values make every score exact in both paths (any summation order), so
items, scores and ranks must be identical, ties included; random float tables agree on items with
scores equal up to float rounding.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from flexmf_assets.flexmf import FlexMFExplicitScorer, FlexMFImplicitScorer, _abi, _native
from flexmf_assets.flexmf.device import DeviceSettings
from flexmf_assets.flexmf.ids import SeenItems
from flexmf_assets.flexmf.scorer import recommend_in_batches
from flexmf_assets.flexmf.topn import native_topn, topk_rows

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the torch path scores")


def _tables(n_users: int, n_items: int, width: int, seed: int, integer: bool):
    g = torch.Generator().manual_seed(seed)
    if integer:  # values in -2..2: sums are exact, and many scores tie
        return (torch.randint(-2, 3, (n_users + 1, width), generator=g).float(),
                torch.randint(-2, 3, (n_items, width), generator=g).float())
    return torch.randn(n_users + 1, width, generator=g), torch.randn(n_items, width, generator=g)


def _seen(n_users: int, n_items: int, pairs: int, seed: int, full_users=()) -> SeenItems:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, n_users, pairs), rng.integers(0, n_items, pairs)
    for u in full_users:  # users who saw every item
        users = np.concatenate([users, np.full(n_items, u)])
        items = np.concatenate([items, np.arange(n_items)])
    frame = pl.DataFrame({"u": users, "i": items}).unique()
    return SeenItems.build(frame["u"].to_numpy(), frame["i"].to_numpy(), n_users, torch.device("cpu"))


def _torch_path(U, V, rows, n, offset, seen, batch_size=7):
    VT = V.T.contiguous()
    unknown = U.shape[0] - 1

    def score(batch):
        return (U.index_select(0, torch.where(batch >= 0, batch, torch.full_like(batch, unknown))) @ VT).add_(offset)

    return recommend_in_batches(score, rows, n, V.shape[0], seen, batch_size)


def _assert_same(fast, ref, exact: bool):
    names = ("position", "item", "score", "rank")
    for name, a, b in zip(names, fast, ref):
        assert a.shape == b.shape, name
        if name == "score" and not exact:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@needs_compiler
@pytest.mark.parametrize("n_items", [1, 16, 517, 1100], ids=lambda n: f"{n}items")
@pytest.mark.parametrize("n", [1, 20, 2000], ids=lambda n: f"n{n}")
def test_kernel_equals_torch_path_exactly(n_items, n):
    """Integer tables: the same items, scores and ranks, ties and all, seen items excluded, for an
    item count that is not a multiple of the panel (16) or the tile (512); n above the catalogue;
    users who saw everything get nothing; unknown users (-1) score by the unknown row."""
    n_users = 101  # not a multiple of the micro-block (6) or the block (48)
    U, V = _tables(n_users, n_items, 9, seed=n_items, integer=True)
    seen = _seen(n_users, n_items, 30 * n_users, seed=1, full_users=(3, 50))
    rows = torch.tensor([*range(n_users), -1, 7, -1])
    fast = native_topn(U, V, rows, n, 0.5, seen, threads=2)
    _assert_same(fast, _torch_path(U, V, rows, n, 0.5, seen), exact=True)
    pos, items = fast[0], fast[1]
    assert not np.isin(pos, [3, 50]).any()  # everything seen: no rows
    k = min(n, n_items)
    assert (np.bincount(pos, minlength=len(rows))[[n_users, n_users + 2]] == k).all()  # unknown: k items
    # ties really happen, and go to the lower item index
    scores = fast[2]
    same_user_tie = (pos[1:] == pos[:-1]) & (scores[1:] == scores[:-1])
    assert same_user_tie.any() == (k > 1 and n_items > 1)
    assert (items[1:][same_user_tie] > items[:-1][same_user_tie]).all()


@needs_compiler
def test_kernel_without_seen_items_and_with_float_tables():
    """Random float tables: items equal the torch path's, scores up to float rounding; nothing excluded."""
    U, V = _tables(300, 1003, 66, seed=5, integer=False)
    rows = torch.arange(300)
    _assert_same(native_topn(U, V, rows, 20, -1.25, None), _torch_path(U, V, rows, 20, -1.25, None, 64), exact=False)


@needs_compiler
def test_thread_count_does_not_change_a_bit():
    U, V = _tables(500, 2111, 33, seed=2, integer=False)
    seen = _seen(500, 2111, 20_000, seed=2)
    rows = torch.arange(500).flip(0)
    results = [native_topn(U, V, rows, 30, 0.0, seen, threads=t) for t in (1, 2, 3, 8)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


@needs_compiler
def test_kernel_refuses_bad_sizes():
    with pytest.raises(RuntimeError, match="flexmf_topn: k or width below 1"):
        _native.run("flexmf_topn", _abi.TopNArgs(k=0, width=4, n_items=3, n_user_rows=2, unknown_row=1))
    with pytest.raises(RuntimeError, match="unknown_row outside"):
        _native.run("flexmf_topn", _abi.TopNArgs(k=1, width=4, n_items=3, n_user_rows=2, unknown_row=2))


def test_torch_ties_go_to_the_lower_index():
    """torch.topk leaves the order of equal scores (and which of them make the cut) to its
    implementation; topk_rows gives them to the lower column index, within and at the boundary."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0],
                           [0.0] * 8,
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    s, i = topk_rows(scores, 3)
    assert i.tolist() == [[1, 2, 4], [0, 1, 2], [0, 1, 2]]
    assert s.tolist() == [[3.0] * 3, [0.0] * 3, [5.0, 4.0, 3.0]]
    big = torch.zeros(4, 5000)
    big[:, 4000:] = 1.0
    assert topk_rows(big, 10)[1].tolist() == [list(range(4000, 4010))] * 4


@needs_compiler
@pytest.mark.parametrize("cls", [FlexMFExplicitScorer, FlexMFImplicitScorer], ids=["explicit", "implicit"])
def test_recommend_uses_the_kernel_on_cpu(cls, monkeypatch):
    """A fitted model recommends the same items through the kernel as through the torch path
    (FLEXMF_NATIVE=0), scores up to float rounding, unknown users included."""
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({"user_id": rng.integers(0, 80, 3000), "item_id": rng.integers(0, 300, 3000),
                          "rating": rng.integers(1, 6, 3000).astype(float)}).unique(["user_id", "item_id"])
    model = cls(device=DeviceSettings("cpu"), embedding_size=16, epochs=2).fit(frame)
    calls = []
    real_run = _native.run
    monkeypatch.setattr(_native, "run", lambda name, args: (calls.append(name), real_run(name, args))[1])
    users = [*range(80), 999]
    fast = model.recommend(users, n=15)
    assert "flexmf_topn" in calls
    monkeypatch.setenv("FLEXMF_NATIVE", "0")
    ref = model.recommend(users, n=15)
    assert fast.select("user_id", "item_id", "rank").equals(ref.select("user_id", "item_id", "rank"))
    np.testing.assert_allclose(fast["score"].to_numpy(), ref["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert fast.filter(pl.col("user_id") == 999).height == 15
