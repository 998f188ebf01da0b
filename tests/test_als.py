"""ALS solvers (flexmf/als.py): recovery of planted structure, monotone half-steps, CG against the
exact solve, the C kernels against the torch engine, thread-count independence, the guards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flexmf_assets.datasets.synthetic import SyntheticConfig, generate, planted_truth
from flexmf_assets.errors import ConfigError, DataValidationError, TrainingError
from flexmf_assets.flexmf import _native
from flexmf_assets.flexmf.ids import IdIndex
from flexmf_assets.flexmf.als import ALSSettings, ExplicitALS, ImplicitALS

HAS_CC = shutil.which("cc") is not None
ENGINES = ["torch", pytest.param("native", marks=pytest.mark.skipif(not HAS_CC, reason="no C compiler"))]
needs_native = pytest.mark.skipif(not HAS_CC, reason="no C compiler: only the torch engine")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The torch engine's small batched ops run best on one thread (the core does the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# data and helpers
# ----------------------------------------------------------------------------------------------

PLANTED = SyntheticConfig(n_users=1000, n_items=300, n_ratings=100_000, rank=4, min_user_ratings=20,
                          max_user_fraction=0.6, noise_sd=0.4, rating_step=0.1, selection_strength=0.0)


def _split(config: SyntheticConfig):
    r = generate(config).ratings
    perm = np.random.default_rng(0).permutation(r.height)
    return r[perm[r.height // 5:]], r[perm[: r.height // 5]]


@pytest.fixture(scope="module")
def planted():
    """Synthetic ratings with a planted rank-4 biased structure (noise sd 0.4), split 80/20 at random."""
    return _split(PLANTED)


@pytest.fixture(scope="module")
def ratings():
    """A smaller planted set (300 users x 200 items, 12,000 ratings) for the invariants."""
    return _split(SyntheticConfig(n_users=300, n_items=200, n_ratings=12_000, rank=4, seed=3))[0]


def _indexed(frame):
    users, u = IdIndex.fit(frame["user_id"])
    items, i = IdIndex.fit(frame["item_id"])
    return users, items, u, i


def explicit(frame, engine="auto", threads=1, epochs=5, **settings):
    """A trained ExplicitALS and its tables (P, Q, bu, bi) and the id indexes."""
    users, items, u, i = _indexed(frame)
    r = frame["rating"].to_numpy().astype(np.float32)
    s = ALSSettings(**{"embedding_size": 4, "regularization": 0.05, **settings})
    k = s.embedding_size
    nu, ni = len(users), len(items)
    P, Q, bu, bi = torch.empty(nu, k), torch.empty(ni, k), torch.empty(nu), torch.empty(ni)
    als = ExplicitALS(s, engine=engine, threads=threads).setup(u, i, r, len(users), len(items), P, Q, bu, bi,
                                                               float(r.mean()))
    als.history = [als.epoch() for _ in range(epochs)]
    return als, users, items


def explicit_predict(als, users, items, frame):
    u, i = users.lookup(frame["user_id"]), items.lookup(frame["item_id"])
    keep = (u >= 0) & (i >= 0)
    u, i = torch.from_numpy(u[keep]), torch.from_numpy(i[keep])
    pred = als.mu + als.bu[u] + als.bi[i] + (als.P[u] * als.Q[i]).sum(1)
    return pred.double().numpy(), keep


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def implicit(u, i, n_users, n_items, engine="auto", threads=1, epochs=5, values=None, **settings):
    s = ALSSettings(**{"embedding_size": 8, "regularization": 1.0, "weight": 4.0, **settings})
    X, Y = torch.empty(n_users, s.embedding_size), torch.empty(n_items, s.embedding_size)
    values = np.ones(len(u), np.float32) if values is None else values
    als = ImplicitALS(s, engine=engine, threads=threads).setup(u, i, values, n_users, n_items, X, Y)
    als.history = [als.epoch() for _ in range(epochs)]
    return als


def _clicks(n_users: int, n_items: int, sd: float):
    """Planted implicit feedback: a user interacts with an item with probability sigmoid(logit) of
    a rank-4 logit matrix (factors ~ N(0, sd^2), offset -3); 5 held-out items per user with >= 10.
    Returns (train user rows, train item rows, held-out mask, true logits)."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0, sd, (n_users, 4)) @ rng.normal(0, sd, (n_items, 4)).T - 3.0
    hit = rng.random(logits.shape) < 1 / (1 + np.exp(-logits))
    held = np.zeros_like(hit)
    for row in range(n_users):
        pos = np.flatnonzero(hit[row])
        if len(pos) >= 10:
            held[row, rng.choice(pos, 5, replace=False)] = True
    u, i = np.nonzero(hit & ~held)
    return u, i, held, logits


@pytest.fixture(scope="module")
def clicks():
    """300 users x 200 items, about 6,000 interactions: for the invariants."""
    return _clicks(300, 200, 1.0)


def recall_at_10(scores, train_u, train_i, held):
    scores = scores.copy()
    scores[train_u, train_i] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    rows = held.any(1)
    return float(np.mean([held[r, top[r]].sum() / held[r].sum() for r in np.flatnonzero(rows)]))


# ----------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bias", ["damped", "learned"])
def test_explicit_reaches_the_noise_floor(planted, engine, bias):
    train, test = planted
    als, users, items = explicit(train, engine, epochs=10, bias=bias, regularization=0.02)
    assert als.engine == engine
    pred, keep = explicit_predict(als, users, items, test)
    floor = planted_truth(PLANTED).rmse(test.filter(keep))  # the noise-free truth's RMSE on the same ratings
    biases_only = rmse(als.mu + als.bu[torch.from_numpy(users.lookup(test["user_id"])[keep])]
                       + als.bi[torch.from_numpy(items.lookup(test["item_id"])[keep])],
                       test["rating"].to_numpy()[keep])
    got = rmse(pred, test["rating"].to_numpy()[keep])
    assert keep.mean() > 0.99
    assert got < floor * 1.05, (got, floor)
    assert 0 < als.data_loss < als.objective == als.history[-1]  # the training MSE, below the full objective
    assert biases_only > floor * 1.2  # the factors carry what the biases cannot


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("exact", [False, True])
def test_implicit_ranks_held_out_items_near_the_planted_oracle(engine, exact):
    """600 users x 300 items, about 32,000 interactions: recall@10 of the held-out items within 10%
    of ranking by the true logits (about 0.55), far above popularity (about 0.08)."""
    u, i, held, logits = _clicks(600, 300, 1.3)
    als = implicit(u, i, *held.shape, engine, epochs=10, exact=exact, embedding_size=8, regularization=20.0,
                   weight=2.0)
    assert als.engine == engine
    ours = recall_at_10((als.X @ als.Y.T).double().numpy(), u, i, held)
    oracle = recall_at_10(logits, u, i, held)
    popularity = recall_at_10(np.broadcast_to(np.bincount(i, minlength=held.shape[1]), held.shape).astype(float),
                              u, i, held)
    assert ours > 0.9 * oracle, (ours, oracle)
    assert ours > popularity + 0.3, (ours, popularity)


# ----------------------------------------------------------------------------------------------
# the algorithm's invariants
# ----------------------------------------------------------------------------------------------


def _half_steps(als, epochs=6):
    out = []
    for _ in range(epochs):
        als.epochs_run += 1
        out += [als.user_step(), als.item_step()]
    return out


def _assert_monotone(objectives):
    steps = np.diff(objectives)
    assert (steps <= 1e-6 * abs(objectives[0])).all(), objectives
    assert objectives[-1] < objectives[0] * 0.9


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bias, reg_exponent, bias_reg", [("damped", 1.0, None), ("learned", 1.0, None),
                                                          ("learned", 0.5, 0.01)])
def test_explicit_half_steps_lower_the_objective(ratings, engine, bias, reg_exponent, bias_reg):
    als, _, _ = explicit(ratings, engine, epochs=0, bias=bias, embedding_size=6, reg_exponent=reg_exponent,
                         bias_regularization=bias_reg)
    _assert_monotone(_half_steps(als))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("exact, cg_steps", [(True, 1), (False, 1), (False, 3)])
def test_implicit_half_steps_lower_the_objective(clicks, engine, exact, cg_steps):
    u, i, held, _ = clicks
    als = implicit(u, i, *held.shape, engine, epochs=0, exact=exact, cg_steps=cg_steps)
    _assert_monotone(_half_steps(als))


@pytest.mark.parametrize("engine", ENGINES)
def test_conjugate_gradient_with_enough_steps_is_the_exact_solve(clicks, engine):
    u, i, held, _ = clicks
    cg = implicit(u, i, *held.shape, engine, epochs=4, cg_steps=20)
    exact = implicit(u, i, *held.shape, engine, epochs=4, exact=True)
    few = implicit(u, i, *held.shape, engine, epochs=4, cg_steps=1)
    S = lambda a: (a.X @ a.Y.T).double()  # noqa: E731
    scale = float(S(exact).abs().max())
    assert float((S(cg) - S(exact)).abs().max()) < 1e-4 * scale
    assert float((S(few) - S(exact)).abs().max()) > 1e-3 * scale  # one step is not the solve: the test can fail
    assert cg.history == pytest.approx(exact.history, rel=1e-6)


@needs_native
@pytest.mark.parametrize("k", [4, 96], ids=["primal", "dual-and-primal"])
@pytest.mark.parametrize("bias, reg_exponent, bias_reg", [("damped", 1.0, None), ("learned", 1.0, None),
                                                          ("learned", 0.5, 0.01)])
def test_explicit_native_and_torch_engines_agree(ratings, bias, reg_exponent, bias_reg, k):
    """k = 96: many rows have fewer ratings than unknowns, and the kernel solves their dual system
    (n x n) where the torch reference solves the k x k one: the same solution."""
    counts = ratings.group_by("item_id").len()["len"]
    assert k + 1 <= counts.min() if k == 4 else counts.min() <= k < counts.max()
    kw = dict(epochs=5, bias=bias, reg_exponent=reg_exponent, bias_regularization=bias_reg, embedding_size=k)
    native, users, items = explicit(ratings, "native", **kw)
    torch_, _, _ = explicit(ratings, "torch", **kw)
    assert native.engine == "native" and torch_.engine == "torch"
    for a, b in ((native.P, torch_.P), (native.Q, torch_.Q), (native.bu, torch_.bu), (native.bi, torch_.bi)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert native.history == pytest.approx(torch_.history, rel=1e-6)


@needs_native
@pytest.mark.parametrize("exact", [False, True])
def test_implicit_native_and_torch_engines_agree(clicks, exact):
    u, i, held, _ = clicks
    native = implicit(u, i, *held.shape, "native", epochs=5, exact=exact)
    torch_ = implicit(u, i, *held.shape, "torch", epochs=5, exact=exact)
    torch.testing.assert_close(native.X @ native.Y.T, torch_.X @ torch_.Y.T, rtol=1e-4, atol=1e-4)
    assert native.history == pytest.approx(torch_.history, rel=1e-5)


@needs_native
@pytest.mark.parametrize("case", ["explicit-learned", "explicit-dual", "implicit-cg", "implicit-exact"])
def test_thread_count_changes_no_bit(ratings, clicks, case):
    def run(threads):
        if case.startswith("explicit"):
            k = 96 if case == "explicit-dual" else 4
            als = explicit(ratings, "native", threads, epochs=3, bias="learned", embedding_size=k)[0]
            return [als.P, als.Q, als.bu, als.bi], als.history
        u, i, held, _ = clicks
        als = implicit(u, i, *held.shape, "native", threads, epochs=3, exact=case == "implicit-exact")
        return [als.X, als.Y], als.history

    (one, h1), (three, h3) = run(1), run(3)
    assert all(torch.equal(a, b) for a, b in zip(one, three))
    assert h1 == h3


# ----------------------------------------------------------------------------------------------
# layout: views of the core's tables, empty rows, repeated pairs, confidence scaling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_trains_column_views_of_wider_tables_in_place(ratings, engine):
    """The core's explicit tables are [rows + 1, k + 2] (factors, bias, constant): ALS trains the
    views in place and leaves every other cell alone."""
    train = ratings
    ref, users, items = explicit(train, engine, epochs=3, bias="learned")
    _, _, u, i = _indexed(train)
    r = train["rating"].to_numpy().astype(np.float32)
    k = 4
    U, V = torch.full((len(users) + 1, k + 2), 7.0), torch.full((len(items) + 1, k + 2), 7.0)
    als = ExplicitALS(ref.settings, engine=engine, threads=1).setup(
        u, i, r, len(users), len(items), U[:-1, :k], V[:-1, :k], U[:-1, k], V[:-1, k + 1], float(r.mean()))
    assert [als.epoch() for _ in range(3)] == ref.history
    assert torch.equal(U[:-1, :k], ref.P) and torch.equal(V[:-1, :k], ref.Q)
    assert torch.equal(U[:-1, k], ref.bu) and torch.equal(V[:-1, k + 1], ref.bi)
    assert (U[-1] == 7).all() and (U[:, k + 1] == 7).all() and (V[-1] == 7).all() and (V[:, k] == 7).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_without_entries_become_zero(engine):
    u, i = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    als = implicit(u, i, 4, 5, engine, epochs=2, embedding_size=2)
    assert (als.X[3] == 0).all() and (als.Y[3:] == 0).all() and als.X[:3].abs().sum() > 0
    X, Y, bu, bi = torch.empty(4, 2), torch.empty(5, 2), torch.empty(4), torch.empty(5)
    ex = ExplicitALS(ALSSettings(embedding_size=2, bias="learned"), engine=engine).setup(
        u, i, np.array([4.0, 3.0, 5.0, 1.0]), 4, 5, X, Y, bu, bi, 3.25)
    ex.epoch()
    assert (X[3] == 0).all() and bu[3] == 0 and (Y[3:] == 0).all() and (bi[3:] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_repeated_pairs_add_up_and_log_confidence_is_a_value_transform(clicks, engine):
    u, i, held, _ = clicks
    twice = implicit(np.concatenate([u, u]), np.concatenate([i, i]), *held.shape, engine, epochs=2)
    doubled = implicit(u, i, *held.shape, engine, epochs=2, values=np.full(len(u), 2.0, np.float32))
    assert torch.equal(twice.X, doubled.X) and twice.history == doubled.history
    r = np.random.default_rng(1).integers(1, 20, len(u)).astype(np.float32)
    log = implicit(u, i, *held.shape, engine, epochs=2, values=r, confidence="log", epsilon=2.0)
    linear = implicit(u, i, *held.shape, engine, epochs=2, values=np.log1p(r / 2.0).astype(np.float32))
    torch.testing.assert_close(log.X, linear.X, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# guards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_singular_systems_raise_naming_regularization(ratings, engine):
    """No penalty and all-zero starting factors: every user's system is zero, so singular."""
    with pytest.raises(TrainingError, match=r"epoch 1 \(user half-step\): objective is nan; the systems of "
                                            r"\d+ user rows are not positive definite; raise regularization"):
        explicit(ratings, engine, epochs=1, regularization=0.0, init_scale=0.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_overflowing_confidence_raises_naming_weight(clicks, engine):
    u, i, held, _ = clicks
    with pytest.raises(TrainingError, match=r"objective is (nan|inf).*raise regularization \(now 1\) or lower weight "
                                            r"\(now 1e\+39\)"):
        implicit(u, i, *held.shape, engine, epochs=1, weight=1e39)


def test_bad_settings_and_inputs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"ALSSettings.cg_steps: must be an integer >= 1, got 0"):
        ALSSettings(cg_steps=0)
    with pytest.raises(ConfigError, match=r"ALSSettings.regularization: must be a finite number >= 0, got -1"):
        ALSSettings(regularization=-1)
    with pytest.raises(ConfigError, match=r"ALSSettings.bias: must be one of damped, learned, got 'biased'"):
        ALSSettings(bias="biased")
    with pytest.raises(ConfigError, match=r"ALSSettings.confidence: must be one of linear, log"):
        ALSSettings(confidence="sqrt")
    with pytest.raises(ConfigError, match="ALS engine: 'cuda' is not one of auto, native, torch"):
        ExplicitALS(engine="cuda")
    X, Y = torch.empty(2, 50), torch.empty(2, 50)
    with pytest.raises(DataValidationError, match="values: implicit ALS needs finite interaction values >= 0"):
        ImplicitALS().setup([0, 1], [1, 0], [1.0, -1.0], 2, 2, X, Y)
    with pytest.raises(DataValidationError, match="ratings: ALS needs finite ratings"):
        ExplicitALS().setup([0, 1], [1, 0], [1.0, np.nan], 2, 2, X, Y, torch.empty(2), torch.empty(2), 1.0)
    with pytest.raises(ValueError, match=r"item_rows must lie in \[0, 2\), got \[0, 2\]"):
        ImplicitALS().setup([0, 1], [2, 0], [1.0, 1.0], 2, 2, X, Y)
    with pytest.raises(ValueError, match=r"Y must be a float32 tensor of shape \(2, 50\)"):
        ImplicitALS().setup([0, 1], [1, 0], [1.0, 1.0], 2, 2, X, Y.double())


def test_settings_from_a_config_object():
    class Config:
        embedding_size, regularization, learning_rate = 16, 0.5, 0.01

    s = ALSSettings.from_config(Config(), weight=2.0)
    assert (s.embedding_size, s.regularization, s.weight, s.epochs) == (16, 0.5, 2.0, 10)


@needs_native
def test_kernels_declare_the_als_entry_points():
    """The ALS kernels take their argument struct of _kernels.h (layout checked by
    tests/test_native.py::test_ctypes_structs_mirror_the_header) and return a status."""
    import ctypes

    from flexmf_assets.flexmf import _abi

    lib = _native.kernels()
    assert lib is not None, _native.status()
    for name, struct in (("flexmf_als_explicit_half", _abi.ALSExplicitArgs),
                         ("flexmf_als_implicit_half", _abi.ALSImplicitArgs)):
        fn = getattr(lib, name)
        assert _abi.KERNELS[name] is struct
        assert fn.argtypes == [ctypes.POINTER(struct)] and fn.restype is ctypes.c_int64


# ----------------------------------------------------------------------------------------------
# solver: als in the scorer core (the strategies ExplicitALSStrategy / ImplicitALSStrategy)
# ----------------------------------------------------------------------------------------------

EXPLICIT_ALS = {"solver": "als", "embedding_size": 4, "epochs": 5, "regularization": 0.05}
IMPLICIT_ALS = {"solver": "als", "embedding_size": 8, "epochs": 5, "regularization": 1.0, "weight": 4.0}


def _clicks_frame(clicks):
    import polars as pl

    u, i, _, _ = clicks
    return pl.DataFrame({"user_id": u, "item_id": i, "rating": np.ones(len(u), np.float32)})


@pytest.mark.parametrize("bias", ["damped", "learned"])
def test_the_scorer_trains_what_the_solver_trains(ratings, bias):
    """FlexMFExplicitScorer(solver="als") runs ExplicitALS on views of its tables: the same
    initialization (the core's draws are the solver's), the same predictions, the engine 'als'."""
    from flexmf_assets.flexmf import FlexMFExplicitScorer

    scorer = FlexMFExplicitScorer({**EXPLICIT_ALS, "bias": bias}).fit(ratings)
    als, users, items = explicit(ratings, bias=bias)
    want, keep = explicit_predict(als, users, items, ratings)
    got = scorer.predict(ratings["user_id"], ratings["item_id"])
    lo, hi = float(ratings["rating"].min()), float(ratings["rating"].max())
    np.testing.assert_allclose(got[keep], np.clip(want, lo, hi), atol=1e-4)
    assert scorer.engine == "als" and scorer.epochs_run == 5
    # the history's train_loss is the data term per rating (the squared error), falling
    losses = [h["train_loss"] for h in scorer.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] == pytest.approx(als.data_loss, rel=1e-5)


@pytest.mark.parametrize("track", ["explicit", "implicit"])
def test_native_and_torch_engines_agree_through_the_scorer(ratings, clicks, monkeypatch, track):
    from flexmf_assets.flexmf import FlexMFExplicitScorer, FlexMFImplicitScorer

    if not HAS_CC:
        pytest.skip("no C compiler")
    cls, cfg, frame = ((FlexMFExplicitScorer, EXPLICIT_ALS, ratings) if track == "explicit"
                       else (FlexMFImplicitScorer, IMPLICIT_ALS, _clicks_frame(clicks)))
    native = cls(cfg).fit(frame)
    monkeypatch.setenv("FLEXMF_NATIVE", "0")
    reference = cls(cfg).fit(frame)
    assert _native.kernels() is None
    np.testing.assert_allclose(native.user_table.numpy(), reference.user_table.numpy(), atol=2e-3)
    np.testing.assert_allclose(native.predict(frame["user_id"], frame["item_id"]),
                               reference.predict(frame["user_id"], frame["item_id"]), atol=2e-3)


def test_validation_history_and_early_stopping_per_iteration(planted):
    """Every iteration is validated; with patience the loop stops once the validation RMSE has not
    improved for that many iterations and the best iteration's tables are kept."""
    from flexmf_assets.flexmf import FlexMFExplicitScorer

    train, test = planted
    # 40 factors with almost no ridge overfit rank-4 data after a few iterations
    scorer = FlexMFExplicitScorer(solver="als", embedding_size=40, epochs=30, regularization=0.001,
                                  patience=2).fit(train, test)
    val = [h["val_rmse"] for h in scorer.history]
    assert all(v is not None for v in val)
    assert scorer.epochs_run < 30 and scorer.epochs_run == scorer.best_epoch + 2
    assert min(val) == val[scorer.best_epoch - 1]
    kept = rmse(scorer.predict(test["user_id"], test["item_id"]), test["rating"].to_numpy())
    assert kept == pytest.approx(min(val), abs=1e-4) and kept < val[-1]


@pytest.mark.parametrize("track", ["explicit", "implicit"])
def test_save_and_load_round_trip(ratings, clicks, tmp_path, track):
    from flexmf_assets.flexmf import FlexMFExplicitScorer, FlexMFImplicitScorer

    cls, cfg, frame = ((FlexMFExplicitScorer, {**EXPLICIT_ALS, "bias": "damped", "damping": 10.0}, ratings)
                       if track == "explicit" else
                       (FlexMFImplicitScorer, {**IMPLICIT_ALS, "confidence": "log", "epsilon": 0.5}, _clicks_frame(clicks)))
    model = cls(cfg).fit(frame)
    model.save(tmp_path / "m")
    back = cls.load(tmp_path / "m")
    assert back.engine == "als" and back.config == model.config and back.config.solver == "als"
    np.testing.assert_array_equal(back.predict(frame["user_id"], frame["item_id"]),
                                  model.predict(frame["user_id"], frame["item_id"]))
    assert back.recommend(n=5).equals(model.recommend(n=5))
    if track == "implicit":  # weighted ALS fits no biases: none saved
        assert set(back.parameters()) == {"user_embedding", "item_embedding"}


def test_singular_systems_through_the_scorer_name_regularization(ratings):
    from flexmf_assets.flexmf import FlexMFExplicitScorer

    with pytest.raises(TrainingError, match=r"^ALS diverged at epoch 1 \(user half-step\): objective is nan; the "
                                            r"systems of \d+ user rows are not positive definite; raise "
                                            r"regularization \(now 0\)$"):
        FlexMFExplicitScorer(solver="als", regularization=0.0, init_scale=0.0, epochs=2).fit(ratings)


@pytest.mark.parametrize("track, values, message", [
    ("explicit", {"solver": "als", "learning_rate": 0.1},
     r"^FlexMFExplicitConfig.learning_rate: applies only to solver 'sgd', not to solver 'als'; leave it out "
     r"\(got 0.1\)$"),
    ("explicit", {"solver": "als", "optimizer": "adam"}, r"optimizer: applies only to solver 'sgd'"),
    ("explicit", {"damping": 2.0}, r"^FlexMFExplicitConfig.damping: applies only to solver 'als', not to solver 'sgd'"),
    ("explicit", {"reg_exponent": 0.5}, r"reg_exponent: applies only to solver 'als'"),
    ("explicit", {"bias": "damped"}, r"^FlexMFExplicitConfig.bias: 'damped' applies only to solver 'als'; solver "
                                     r"'sgd' takes true or false$"),
    ("explicit", {"solver": "als", "bias": False}, r"bias: solver 'als' always fits biases: 'learned' \(or true\) "
                                                   r"or 'damped', got False"),
    ("explicit", {"solver": "als", "bias": "biased"}, r"bias: expected true or false, got 'biased'|bias: 'biased' "
                                                      r"is not one of"),
    ("explicit", {"solver": "alternating"}, r"solver: 'alternating' is not one of 'sgd', 'als'"),
    ("explicit", {"solver": "als", "reg_exponent": 9.0}, r"reg_exponent: must be >= 0 and <= 4, got 9.0"),
    ("explicit", {"solver": "als", "bias_regularization": -1.0}, r"bias_regularization: must be >= 0"),
    ("implicit", {"solver": "als", "preset": "bpr"}, r"^FlexMFImplicitConfig.preset: applies only to solver 'sgd'"),
    ("implicit", {"solver": "als", "loss": "warp"}, r"loss: applies only to solver 'sgd'"),
    ("implicit", {"solver": "als", "user_bias": True}, r"user_bias: applies only to solver 'sgd'"),
    ("implicit", {"weight": 2.0}, r"weight: applies only to solver 'als', not to solver 'sgd'"),
    ("implicit", {"cg_steps": 5}, r"cg_steps: applies only to solver 'als'"),
    ("implicit", {"solver": "als", "cg_steps": 0}, r"cg_steps: must be >= 1 and <= 1,000, got 0"),
    ("implicit", {"solver": "als", "confidence": "sqrt"}, r"confidence: 'sqrt' is not one of 'linear', 'log'"),
    ("implicit", {"solver": "als", "epsilon": 0.0}, r"epsilon: must be > 0"),
    ("implicit", {"solver": "als", "weight": -1.0}, r"weight: must be >= 0"),
])
def test_solver_fields_are_validated_in_one_line(track, values, message):
    from flexmf_assets.flexmf import FlexMFExplicitConfig, FlexMFImplicitConfig

    cls = FlexMFExplicitConfig if track == "explicit" else FlexMFImplicitConfig
    with pytest.raises(ConfigError, match=message) as info:
        cls.from_dict(values)
    assert "\n" not in str(info.value)


def test_fields_of_the_other_solver_at_a_neutral_value_change_nothing():
    """A key read as overrides of the implicit ``default`` set (loss logistic, uniform negatives) with
    ``solver=als`` is the same configuration as ``solver=als`` alone: such values are the defaults."""
    from flexmf_assets.flexmf import FlexMFImplicitConfig

    plain = FlexMFImplicitConfig(solver="als")
    filled = FlexMFImplicitConfig.from_dict({"loss": "logistic", "negative_strategy": "uniform", "item_bias": False,
                                             "solver": "als"})
    assert filled == plain and filled.loss is None and filled.item_bias is True
    assert FlexMFImplicitConfig.from_dict(plain.to_dict()) == plain


def test_keys_with_solver_fields_round_trip(tmp_path):
    from flexmf_assets.project import load_project

    (tmp_path / "flexmf.yaml").write_text("implicit_hparams:\n  default: {loss: logistic, negative_strategy: uniform}\n")
    project = load_project(tmp_path / "flexmf.yaml", env={"FLEXMF_DATA_DIR": str(tmp_path)})
    key = "solver=als;embedding_size=128"
    cfg = project.resolve_hparams("explicit", key)
    assert (cfg.solver, cfg.embedding_size, cfg.bias) == ("als", 128, True)
    assert project.canonical_key("explicit", "bias=damped;solver=als;damping=2.5") == \
        "bias=damped;solver=als;damping=2.5"
    assert project.resolve_hparams("explicit", "solver=als;bias=damped").bias == "damped"
    icfg = project.resolve_hparams("implicit", "solver=als;weight=1;confidence=log;exact=true")
    assert (icfg.solver, icfg.weight, icfg.confidence, icfg.exact) == ("als", 1.0, "log", True)
    for track in ("explicit", "implicit"):  # the named sets als, and their fingerprints equal their keys'
        named = project.resolve_hparams(track, "als")
        assert named.solver == "als"
        cls = type(named)
        spelled = cls.canonical_key({k: v for k, v in named.to_dict().items() if v != getattr(cls(), k)})
        assert project.fingerprint(track, spelled) == project.fingerprint(track, "als"), spelled
    with pytest.raises(ConfigError, match=r"bias=maybe is not true or false \(nor one of 'learned', 'damped'\)"):
        project.resolve_hparams("explicit", "solver=als;bias=maybe")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("track", ["explicit", "implicit"])
def test_cuda_matches_the_cpu(ratings, clicks, track):
    """The GPU path (torch engine, batched float32 solves) trains the model the CPU trains."""
    from flexmf_assets.flexmf import FlexMFExplicitScorer, FlexMFImplicitScorer

    cls, cfg, frame = ((FlexMFExplicitScorer, EXPLICIT_ALS, ratings) if track == "explicit"
                       else (FlexMFImplicitScorer, IMPLICIT_ALS, _clicks_frame(clicks)))
    cpu, gpu = cls(cfg).fit(frame), cls(cfg, device="cuda").fit(frame)
    assert gpu.user_table.is_cuda and gpu.engine == "als"
    np.testing.assert_allclose(gpu.predict(frame["user_id"], frame["item_id"]),
                               cpu.predict(frame["user_id"], frame["item_id"]), atol=5e-3)
