"""Negative samplers never return a user's positives; configs reject invalid combinations."""

from __future__ import annotations

import pytest
import torch

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig
from flexmf_assets.flexmf.losses import warp_rank_weights
from flexmf_assets.flexmf.sampling import PositiveSet, make_sampler


def _dense_positives(n_users=50, n_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy users: each user has 30-90% of the items, so collisions are frequent
    dens = torch.rand(n_users, 1, generator=g) * 0.6 + 0.3
    mask = torch.rand(n_users, n_items, generator=g) < dens
    u, i = mask.nonzero(as_tuple=True)
    return mask, u, i


@pytest.mark.parametrize("dense_limit", [0, 1 << 20])
def test_positive_set_membership(dense_limit):
    mask, u, i = _dense_positives()
    ps = PositiveSet(u, i, mask.shape[1], dense_limit=dense_limit)
    assert (ps.table is None) == (dense_limit == 0)
    users = torch.arange(mask.shape[0]).repeat_interleave(mask.shape[1])
    items = torch.arange(mask.shape[1]).repeat(mask.shape[0])
    assert torch.equal(ps.contains(users, items), mask.reshape(-1))


def _pool_scores(table: torch.Tensor, users: torch.Tensor):
    """The engine's pooled scorer: distinct users x pool, and each row's index into them."""
    rows, inv = torch.unique(users, return_inverse=True)
    return lambda pool: (table[rows][:, pool], inv)


@pytest.mark.parametrize("strategy", ["uniform", "popular", "misranked"])
def test_sampled_negatives_are_never_positives(strategy):
    mask, u, i = _dense_positives()
    ps = PositiveSet(u, i, mask.shape[1])
    sampler = make_sampler(strategy, ps, i, candidates=8)
    table = torch.randn(mask.shape)
    users = u.repeat(4)
    gen = torch.Generator().manual_seed(1)
    out = sampler.sample(users, 3, pool_scores=_pool_scores(table, users), generator=gen)
    assert out.items.shape == (users.numel(), 3)
    is_pos = mask[users.unsqueeze(1), out.items]
    assert not (is_pos & out.valid).any()
    assert out.valid.float().mean() > 0.5  # masking is the exception, not the rule


def test_misranked_picks_hardest_and_warp_first_violator():
    n_items = 20
    ps = PositiveSet(torch.tensor([0]), torch.tensor([19]), n_items)
    score = torch.arange(n_items, dtype=torch.float32)  # item 19 (positive) scores highest
    sampler = make_sampler("misranked", ps, torch.tensor([19]), candidates=n_items * 3)
    users = torch.zeros(200, dtype=torch.long)
    kw = {"pool_scores": _pool_scores(score.unsqueeze(0), users)}
    gen = torch.Generator().manual_seed(0)
    out = sampler.sample(users, 1, generator=gen, **kw)
    assert out.valid.all() and (out.items == 18).float().mean() > 0.9  # 18: best non-positive
    pos = torch.full((200,), 10.0)
    warp = sampler.sample(users, 1, pos_scores=pos, generator=gen, **kw)
    # violators of margin 1 against score 10: items 10..18; every returned negative violates
    assert warp.valid.all() and (warp.items[:, 0] >= 10).all() and (warp.items[:, 0] <= 18).all()
    assert (warp.trials >= 1).all()
    # the first violator: every earlier candidate scored below the margin, so trials > 1 happens
    assert (warp.trials > 1).any()


def test_pooled_candidates_cover_the_catalogue():
    """Each batch's pool is fresh and uniform: over batches every item is proposed."""
    n_items = 300
    ps = PositiveSet(torch.tensor([0]), torch.tensor([0]), n_items)
    sampler = make_sampler("misranked", ps, torch.tensor([0]), candidates=4, pool_size=50)
    users = torch.zeros(64, dtype=torch.long)
    flat = torch.zeros(1, n_items)  # all ties: argmax picks the first candidate, a uniform pool slot
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([sampler.sample(users, 1, pool_scores=_pool_scores(flat, users),
                                     generator=gen).items.reshape(-1) for _ in range(60)])
    assert seen.unique().numel() > 0.95 * (n_items - 1) and not (seen == 0).any()


def test_unknown_sampler_is_a_config_error():
    ps = PositiveSet(torch.tensor([0]), torch.tensor([1]), 3)
    with pytest.raises(ConfigError, match=r"negative_strategy: 'hardest' is not one of 'uniform', 'popular', "
                                          r"'misranked'"):
        make_sampler("hardest", ps, torch.tensor([1]))


def test_warp_rank_weights():
    t = warp_rank_weights(11)  # N - 1 = 10
    assert t[1].item() == pytest.approx(sum(1 / j for j in range(1, 11)))
    assert t[3].item() == pytest.approx(1 + 1 / 2 + 1 / 3)  # floor(10/3) = 3
    assert t[10].item() == pytest.approx(1.0)


def test_presets_fill_and_explicit_values_win():
    assert FlexMFImplicitConfig().loss == "logistic" and FlexMFImplicitConfig().user_bias is True
    bpr = FlexMFImplicitConfig(preset="bpr")
    assert (bpr.loss, bpr.negative_strategy, bpr.user_bias) == ("pairwise", "uniform", False)
    warp = FlexMFImplicitConfig.from_dict({"preset": "warp"})
    assert (warp.loss, warp.negative_strategy) == ("warp", "misranked")
    mixed = FlexMFImplicitConfig.from_dict({"preset": "bpr", "negative_strategy": "popular"})
    assert (mixed.loss, mixed.negative_strategy) == ("pairwise", "popular")
    assert FlexMFImplicitConfig.from_dict(mixed.to_dict()) == mixed


@pytest.mark.parametrize(
    "data, field",
    [
        ({"loss": "warp", "negative_strategy": "uniform"}, "negative_strategy"),
        ({"preset": "warp", "negative_strategy": "popular"}, "negative_strategy"),
        ({"loss": "hinge"}, "loss"),
        ({"embedding_size": 0}, "embedding_size"),
        ({"negative_count": 0}, "negative_count"),
        ({"preset": "als"}, "preset"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"reg_method": "L1"}, "reg_method"),
    ],
)
def test_invalid_configs_raise_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        FlexMFImplicitConfig.from_dict(data)


def test_typo_is_suggested():
    with pytest.raises(ConfigError, match="did you mean 'negative_strategy'"):
        FlexMFImplicitConfig.from_dict({"negative_stratgy": "uniform"})
