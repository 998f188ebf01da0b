"""FlexMFImplicitScorer on a planted-cluster implicit dataset: every loss/sampler beats popularity."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from flexmf_assets.errors import DataValidationError
from flexmf_assets.evaluation.topn import PopularityBaseline, topn_metrics
from flexmf_assets.flexmf.implicit import FlexMFImplicitScorer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    """200 users, 120 items in 4 clusters; users like items of their cluster, plus popular noise."""
    rng = np.random.default_rng(7)
    n_users, n_items, n_clusters = 200, 120, 4
    item_cluster = np.arange(n_items) % n_clusters
    train, test = [], []
    for u in range(n_users):
        own = np.flatnonzero(item_cluster == u % n_clusters)
        liked = rng.choice(own, 18, replace=False)
        noise = rng.choice(np.arange(12), 3, replace=False)  # globally popular items 0..11
        for i in liked[:3]:
            test.append((u, int(i)))
        for i in set(liked[3:].tolist()) | set(noise.tolist()):
            if (u, int(i)) not in test:
                train.append((u, int(i), 4.0))
    train = pl.DataFrame(train, schema=["user_id", "item_id", "rating"], orient="row")
    test = pl.DataFrame(test, schema=["user_id", "item_id"], orient="row")
    pop = PopularityBaseline().fit(train).recommend(test["user_id"].unique(), n=10)
    return train, test, topn_metrics(pop, test, ks=(10,)).means["ndcg@10"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"preset": "bpr"},
        {"preset": "warp"},
        {"loss": "logistic", "negative_strategy": "popular"},
        {"loss": "pairwise", "negative_strategy": "misranked"},
        {"loss": "logistic", "negative_strategy": "misranked", "reg_method": "L2", "regularization": 1e-4},
    ],
)
def test_each_loss_and_sampler_beats_popularity(planted, overrides):
    train, test, pop_ndcg = planted
    model = FlexMFImplicitScorer(embedding_size=16, epochs=15, batch_size=256, learning_rate=0.02,
                                 device="cpu", **overrides).fit(train)
    recs = model.recommend(test["user_id"].unique(), n=10)
    ndcg = topn_metrics(recs, test, ks=(10,)).means["ndcg@10"]
    assert pop_ndcg < 0.15
    # a perfect cluster model ranks 3 test items among ~15 unseen in-cluster items: ndcg ~0.4
    assert ndcg > max(0.25, 3 * pop_ndcg), (overrides, ndcg, pop_ndcg)
    assert model.epochs_run == 15 and len(model.history) == 15
    assert model.updates_per_second > 0


def test_recommend_excludes_seen_and_ranks_in_order(planted):
    train, test, _ = planted
    model = FlexMFImplicitScorer(embedding_size=8, epochs=2, device="cpu").fit(train)
    recs = model.recommend(n=15)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.join(train, on=["user_id", "item_id"], how="inner").height == 0
    for _, g in recs.group_by("user_id"):
        assert g["rank"].to_list() == list(range(1, g.height + 1))
        assert (g["score"].diff().drop_nulls() <= 0).all()
    again = model.recommend([0, 1], n=5, exclude_seen=False)
    scores = model.predict(again["user_id"], again["item_id"])
    np.testing.assert_allclose(scores, again["score"].to_numpy(), rtol=1e-5)


def test_early_stopping_restores_best_epoch_and_save_load(planted, tmp_path):
    train, test, _ = planted
    model = FlexMFImplicitScorer(embedding_size=16, epochs=12, batch_size=256, learning_rate=0.05,
                                 patience=2, device="cpu").fit(train, validation=test)
    curve = [row["val_ndcg"] for row in model.history]
    assert model.best_epoch == int(np.argmax(curve)) + 1
    recs = model.recommend(test["user_id"].unique(), n=10)
    assert topn_metrics(recs, test, ks=(10,)).means["ndcg@10"] == pytest.approx(max(curve))
    model.save(tmp_path / "m")
    back = FlexMFImplicitScorer.load(tmp_path / "m", device="cpu")
    assert back.config == model.config and back.best_epoch == model.best_epoch
    assert back.recommend(n=5).equals(model.recommend(n=5))


def test_a_model_saved_without_its_sizes_still_loads(planted, tmp_path):
    """Implicit models saved before the scorers shared one core recorded no n_users/n_items in
    metadata.json: their id lists give the sizes, and they load and score as before."""
    import json

    train, _, _ = planted
    model = FlexMFImplicitScorer(embedding_size=8, epochs=2, device="cpu").fit(train)
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "metadata.json").read_text())
    for field in ("n_users", "n_items"):
        del meta[field]
    (path / "metadata.json").write_text(json.dumps(meta))
    back = FlexMFImplicitScorer.load(path, device="cpu")
    assert (back.n_users, back.n_items) == (model.n_users, model.n_items)
    assert back.recommend(n=5).equals(model.recommend(n=5))


def test_min_rating_filters_interactions():
    train = pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "rating": [5.0, 1.0, 4.0, 2.0]})
    model = FlexMFImplicitScorer(min_rating=3.0, epochs=1, device="cpu")
    with pytest.raises(DataValidationError, match="at least 2 distinct items"):
        model.fit(train)
    with pytest.raises(DataValidationError, match="no 'rating' column"):
        model.fit(train.drop("rating"))


# ------------------------------------------------------------------------------------------------
# the hand-derived training step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["logistic", "pairwise", "warp"])
def test_hand_derived_gradients_match_autograd(loss):
    import torch.nn.functional as F

    from flexmf_assets.flexmf.losses import backprop as _backprop, score_gradients as _score_gradients

    g = torch.Generator().manual_seed(3)
    b, c, w = 40, 1 if loss == "warp" else 3, 6
    P = torch.randn(7, w, generator=g)
    Q = torch.randn(11, w, generator=g)
    uinv = torch.randint(0, 7, (b,), generator=g).unsqueeze(1).expand(b, 1 + c).reshape(-1)
    iinv = torch.randint(0, 11, (b * (1 + c),), generator=g)
    valid = (torch.rand(b, c, generator=g) > 0.2).float()
    warp_w = torch.rand(b, generator=g) * 3 if loss == "warp" else None

    Pa, Qa = P.clone().requires_grad_(True), Q.clone().requires_grad_(True)
    s = (Pa[uinv] * Qa[iinv]).sum(1).view(b, 1 + c)
    if loss == "logistic":
        ref = (2.0 * F.softplus(-s[:, 0]).sum() + (F.softplus(s[:, 1:]) * valid).sum()) / b
    elif loss == "pairwise":
        ref = (F.softplus(s[:, 1:] - s[:, :1]) * valid).sum() / b
    else:
        ref = (warp_w * valid[:, 0] * F.relu(1 - s[:, 0] + s[:, 1])).sum() / b
    ref.backward()

    ds, total = _score_gradients(loss, s.detach(), valid, b, 2.0, warp_w)
    g_user, g_item = _backprop(ds, Q[iinv], P[uinv], uinv, iinv, 7, 11)
    assert float(total) == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_user, Pa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_item, Qa.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset, weight_decay", [(10_000, 0.05), (10_000, 0.0), (0, 0.05)])
def test_lazy_adamw_catches_up_to_dense_adamw(offset, weight_decay):
    """Sparse row updates + closed-form catch-up == torch's dense AdamW (exact once Adam's bias
    correction has settled; within a few percent of the movement in the first steps)."""
    from flexmf_assets.flexmf.optim import SparseAdam

    g = torch.Generator().manual_seed(0)
    n, w, steps = 30, 5, 200
    init = torch.randn(n, w, generator=g)
    dense = init.clone().requires_grad_(True)
    opt = torch.optim.AdamW([dense], lr=0.01, weight_decay=weight_decay)
    dense.grad = torch.zeros(n, w)
    opt.step()  # creates the state; then start both from step ``offset`` with zero moments
    opt.state[dense]["step"].fill_(offset)
    with torch.no_grad():
        dense.copy_(init)
    lazy = SparseAdam(init.clone(), 0.01, weight_decay, catch_up=True)
    lazy.last.fill_(offset)
    for t in range(offset + 1, offset + steps + 1):
        rows = torch.randperm(n, generator=g)[:4].sort().values
        grad = torch.randn(len(rows), w, generator=g)
        full = torch.zeros(n, w)
        full[rows] = grad
        dense.grad = full
        opt.step()
        lazy.step(rows, grad, t)
    lazy.flush(offset + steps)
    table = lazy.table
    moved = (dense.detach() - init).abs().max().item()
    err = (table - dense.detach()).abs().max().item()
    assert moved > 0.3
    assert err < (1e-4 if offset else 0.05 * moved), (err, moved)


def test_same_seed_same_model_on_cpu(planted):
    train, _, _ = planted
    cfg = dict(embedding_size=8, epochs=3, batch_size=128, device="cpu", preset="warp")
    a = FlexMFImplicitScorer(**cfg).fit(train)
    b = FlexMFImplicitScorer(**cfg).fit(train)
    c = FlexMFImplicitScorer(**cfg, seed=43).fit(train)
    for name, t in a.parameters().items():
        assert torch.equal(t, b.parameters()[name]), name
    assert not torch.equal(a.parameters()["item_embedding"], c.parameters()["item_embedding"])
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("overrides", [{}, {"preset": "warp"}, {"loss": "pairwise", "negative_strategy": "misranked"}])
def test_cuda_training_and_recommend(planted, overrides, tmp_path):
    train, test, pop_ndcg = planted
    model = FlexMFImplicitScorer(embedding_size=16, epochs=15, batch_size=256, learning_rate=0.02,
                                 device="cuda", **overrides).fit(train, validation=test)
    assert model.device.type == "cuda" and all(t.is_cuda for t in model.parameters().values())
    recs = model.recommend(test["user_id"].unique(), n=10)
    assert topn_metrics(recs, test, ks=(10,)).means["ndcg@10"] > max(0.25, 3 * pop_ndcg)
    assert recs.join(train, on=["user_id", "item_id"], how="inner").height == 0
    back = FlexMFImplicitScorer.load(model.save(tmp_path / "m"), device="cpu")
    assert back.recommend(n=5)["item_id"].len() == model.recommend(n=5)["item_id"].len()


def test_predict_matches_recommend_and_unknown_ids_are_finite():
    from flexmf_assets.datasets.synthetic import generate

    ratings = generate("synthetic-100k").ratings
    model = FlexMFImplicitScorer(epochs=1, embedding_size=8).fit(ratings)
    user = ratings["user_id"][0]
    recs = model.recommend([user], n=5)
    np.testing.assert_allclose(model.predict(recs["user_id"], recs["item_id"]), recs["score"].to_numpy(), rtol=1e-5)
    item = ratings["item_id"][0]
    out = model.predict([10**9, user, 10**9], [item, 10**9, 10**9])
    assert np.isfinite(out).all() and out[2] == 0.0
    assert out[0] == pytest.approx(float(model.parameters()["item_bias"][model.items.lookup([item])[0]]))


@pytest.mark.parametrize("ids", ["int", "str", "huge"])
def test_interactions_keep_the_first_of_each_pair_in_order(ids):
    """Distinct pairs in first-seen order, whether the ids are small integers (the fast distinctness
    check), strings or integers too large for its keys; already distinct pairs come back as they are."""
    from flexmf_assets.flexmf.implicit import interactions

    users, items = [3, 1, 3, 2, 1, 3], [7, 7, 7, 9, 8, 9]
    conv = {"int": lambda x: x, "str": lambda x: f"u{x}", "huge": lambda x: x + 2**62}[ids]
    frame = pl.DataFrame({"user_id": [conv(u) for u in users], "item_id": items, "rating": [1.0] * 6})
    got = interactions(frame, None)
    assert got.rows() == [(conv(3), 7), (conv(1), 7), (conv(2), 9), (conv(1), 8), (conv(3), 9)]
    distinct = frame.filter(pl.Series([True, True, False, True, True, True]))
    assert interactions(distinct, None).rows() == got.rows()
