"""Rating metrics and the damped bias baseline against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.evaluation import BiasBaseline, per_user_table, rating_metrics

TRUTH = pl.DataFrame(
    {"user_id": [1, 1, 1, 2], "item_id": [10, 20, 30, 10], "rating": [4.0, 3.0, 5.0, 2.0]}
)
# errors (prediction - rating): user 1: +0.5, -1.0, 0.0; user 2: +2.0
PRED = pl.DataFrame(
    {"user_id": [2, 1, 1, 1], "item_id": [10, 30, 20, 10], "prediction": [4.0, 5.0, 2.0, 4.5]}
)


def test_rating_metrics_hand_computed():
    m = rating_metrics(TRUTH, PRED)
    assert m.rmse == pytest.approx(math.sqrt((0.25 + 1.0 + 0.0 + 4.0) / 4))
    assert m.mae == pytest.approx((0.5 + 1.0 + 0.0 + 2.0) / 4)
    user1_rmse = math.sqrt((0.25 + 1.0) / 3)
    assert m.user_rmse == pytest.approx((user1_rmse + 2.0) / 2)
    assert m.user_mae == pytest.approx((0.5 + 2.0) / 2)
    assert (m.n, m.n_users) == (4, 2)
    assert m.to_dict()["rmse"] == m.rmse


def test_aligned_array_equals_joined_frame():
    aligned = [4.5, 2.0, 5.0, 4.0]
    assert rating_metrics(TRUTH, np.array(aligned)) == rating_metrics(TRUTH, PRED)


def test_per_user_table():
    table = per_user_table(TRUTH, PRED)
    assert table["user_id"].to_list() == [1, 2]
    assert table["n"].to_list() == [3, 1]
    assert table["rmse"].to_list() == pytest.approx([math.sqrt(1.25 / 3), 2.0])
    assert table["mae"].to_list() == pytest.approx([0.5, 2.0])


def test_missing_and_duplicate_predictions():
    partial = PRED.filter(pl.col("user_id") == 1)
    with pytest.raises(DataValidationError, match="1 of 4 truth rows"):
        rating_metrics(TRUTH, partial)
    m = rating_metrics(TRUTH, partial, missing="skip")
    assert m.n == 3 and m.rmse == pytest.approx(math.sqrt(1.25 / 3))
    with pytest.raises(DataValidationError, match="duplicate"):
        rating_metrics(TRUTH, pl.concat([PRED, PRED]))
    with pytest.raises(DataValidationError, match="NaN"):
        rating_metrics(TRUTH, [1.0, float("nan"), 2.0, 3.0])
    with pytest.raises(DataValidationError, match="3 values for 4"):
        rating_metrics(TRUTH, [1.0, 2.0, 3.0])
    with pytest.raises(DataValidationError, match="prediction"):
        rating_metrics(TRUTH, PRED.drop("prediction"))
    with pytest.raises(ConfigError, match="missing"):
        rating_metrics(TRUTH, PRED, missing="zero")  # type: ignore[arg-type]


def test_bias_baseline_hand_computed():
    # mu = 3.5; damping 1
    train = pl.DataFrame(
        {"user_id": ["a", "a", "b", "b"], "item_id": [1, 2, 1, 3], "rating": [5.0, 3.0, 4.0, 2.0]}
    )
    base = BiasBaseline(damping=1.0).fit(train)
    mu = 3.5
    b1 = ((5 - mu) + (4 - mu)) / (2 + 1)  # 2/3
    b2 = (3 - mu) / (1 + 1)  # -0.25
    b3 = (2 - mu) / (1 + 1)  # -0.75
    ba = ((5 - mu - b1) + (3 - mu - b2)) / (2 + 1)
    bb = ((4 - mu - b1) + (2 - mu - b3)) / (2 + 1)
    pred = base.predict(["a", "b", "a", "zz", "zz"], [2, 1, 99, 3, 99])
    expected = [mu + ba + b2, mu + bb + b1, mu + ba, mu + b3, mu]
    np.testing.assert_allclose(pred, expected)
    frame = base.predict_frame(pl.DataFrame({"user_id": ["b", "a"], "item_id": [3, 1]}))
    assert frame["user_id"].to_list() == ["b", "a"]  # row order kept
    np.testing.assert_allclose(frame["prediction"].to_numpy(), [mu + bb + b3, mu + ba + b1])


def test_bias_baseline_separate_damping_and_errors():
    train = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "rating": [4.0, 2.0]})
    base = BiasBaseline(damping=(0.0, 2.0)).fit(train)  # user damping 0, item damping 2
    # mu 3, b_1 = 1/3, b_2 = -1/3, b_u = ((4-3-1/3) + (2-3+1/3)) / 2 = 0
    np.testing.assert_allclose(base.predict([1, 1], [1, 2]), [3 + 1 / 3, 3 - 1 / 3])
    with pytest.raises(ConfigError, match="damping"):
        BiasBaseline(damping=-1)
    with pytest.raises(DataValidationError, match="fit"):
        BiasBaseline().predict([1], [1])
    with pytest.raises(DataValidationError, match="no ratings"):
        BiasBaseline().fit(train.head(0))
