"""GX validation of ratings: ml-latest-small (or its synthetic stand-in) passes, one corruption per check fails."""

from __future__ import annotations

import json
import zipfile

import polars as pl
import pytest

from flexmf_assets.datasets.validation import (
    CANONICAL_SCHEMA,
    CHECK_NAMES,
    ValidationReport,
    ratings_suite,
    validate_ratings,
)
from flexmf_assets.errors import ConfigError, DataValidationError

@pytest.fixture(scope="module")
def ratings(movielens_zip) -> pl.DataFrame:
    """ml-latest-small ratings, parsed simply and cast to the canonical dtypes."""
    with zipfile.ZipFile(movielens_zip) as zf:
        raw = pl.read_csv(zf.read("ml-latest-small/ratings.csv"))
    return raw.rename({"userId": "user_id", "movieId": "item_id"}).cast(CANONICAL_SCHEMA)


def _set(df: pl.DataFrame, column: str, rows: dict[int, object]) -> pl.DataFrame:
    """A copy of ``df`` with ``column`` replaced at the given row numbers."""
    idx = pl.int_range(pl.len())
    expr = pl.col(column)
    for row, value in rows.items():
        expr = pl.when(idx == row).then(pl.lit(value, dtype=df.schema[column])).otherwise(expr)
    return df.with_columns(expr.alias(column))


def _failed(report: ValidationReport) -> set[str]:
    return {o.check_name for o in report.failed}


def _assert_json(report: ValidationReport) -> None:
    for o in report.outcomes:
        json.dumps([o.details, o.unexpected_examples], allow_nan=False)


def test_real_movielens_passes_every_check(ratings, movielens_archive):
    n_ratings = movielens_archive.ratings  # 100,836 rows of ml-latest-small/ratings.csv
    assert ratings.height == n_ratings
    report = validate_ratings(ratings)
    assert [o.check_name for o in report.outcomes] == list(CHECK_NAMES)
    assert report.success, report.summary()
    assert all(o.unexpected_count == 0 and o.unexpected_examples == [] for o in report.outcomes)
    assert report["min_rows"].details["observed_value"] == n_ratings
    assert report["rating_in_scale"].details["element_count"] == n_ratings
    assert report["timestamp_plausible"].details["min_value"] == 631_152_000
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES) == 7
    _assert_json(report)


def test_missing_column_fails_schema_and_names_it(ratings):
    report = validate_ratings(ratings.drop("timestamp"))
    schema = report["schema"]
    assert not schema.success
    assert schema.unexpected_count == 1
    assert schema.unexpected_examples == [
        {"column": "timestamp", "dtype": "missing", "expected": "Int64"}
    ]
    assert schema.details["gx_columns_match"] is False  # GX saw the column set too
    assert "timestamp is missing" in schema.message
    # checks that need the column cannot run and say why; the others still pass
    assert _failed(report) == {"schema", "no_nulls", "timestamp_plausible"}
    assert report["timestamp_plausible"].details["not_evaluated"] == "column timestamp is missing"
    assert report["unique_user_item"].success and report["rating_in_scale"].success


def test_wrong_dtype_fails_schema_only(ratings):
    report = validate_ratings(ratings.with_columns(pl.col("rating").cast(pl.Float64)))
    assert _failed(report) == {"schema"}
    schema = report["schema"]
    assert schema.unexpected_count == 1
    assert schema.details["wrong_dtypes"] == {"rating": "Float64"}
    assert schema.details["gx_columns_match"] is True
    assert "column rating has dtype Float64, expected Float32" in schema.message


def test_non_numeric_rating_is_not_evaluated(ratings):
    report = validate_ratings(ratings.with_columns(pl.col("rating").cast(pl.Utf8)))
    assert _failed(report) == {"schema", "rating_in_scale", "rating_on_step"}
    assert "non-numeric dtype String" in report["rating_in_scale"].details["not_evaluated"]


def test_nulls_fail_no_nulls(ratings):
    bad = _set(_set(ratings, "user_id", {3: None}), "timestamp", {8: None})
    report = validate_ratings(bad)
    assert _failed(report) == {"no_nulls"}
    nulls = report["no_nulls"]
    assert nulls.unexpected_count == 2
    assert nulls.details["null_counts"] == {"user_id": 1, "item_id": 0, "rating": 0, "timestamp": 1}
    assert {"row": 3, "column": "user_id"} in nulls.unexpected_examples
    assert {"row": 8, "column": "timestamp"} in nulls.unexpected_examples
    _assert_json(report)


def test_null_rating_is_a_null_not_a_scale_violation(ratings):
    report = validate_ratings(_set(ratings, "rating", {4: None}))
    assert _failed(report) == {"no_nulls"}
    assert report["no_nulls"].unexpected_examples == [{"row": 4, "column": "rating"}]


def test_timestamps_may_be_absent_as_a_whole(ratings):
    report = validate_ratings(ratings.with_columns(pl.lit(None, dtype=pl.Int64).alias("timestamp")))
    assert report.success, report.summary()
    assert "all null" in report["no_nulls"].details["timestamp"]
    assert report["timestamp_plausible"].details["all_null"] is True


def test_out_of_scale_and_nan_fail_rating_in_scale(ratings):
    bad = _set(ratings, "rating", {10: 5.5, 20: float("nan"), 30: float("inf")})
    report = validate_ratings(bad)
    # NaN is not mistaken for a null, and 5.5 is on the 0.5 grid
    assert _failed(report) == {"rating_in_scale"}
    scale = report["rating_in_scale"]
    assert scale.unexpected_count == 3
    assert scale.unexpected_examples == [
        {"row": 10, "rating": 5.5},
        {"row": 20, "rating": "NaN"},
        {"row": 30, "rating": "inf"},
    ]
    _assert_json(report)


def test_off_step_rating_fails_rating_on_step(ratings):
    report = validate_ratings(_set(ratings, "rating", {7: 3.3}))
    assert _failed(report) == {"rating_on_step"}
    step = report["rating_on_step"]
    assert step.unexpected_count == 1
    assert step.unexpected_examples == [{"row": 7, "rating": 3.3}]
    assert "3.3" in step.message
    # with no declared step the check passes as skipped
    skipped = validate_ratings(_set(ratings, "rating", {7: 3.3}), rating_step=None)
    assert skipped.success
    assert skipped["rating_on_step"].details == {"skipped": "rating_step is None"}


def test_step_tolerance_absorbs_float32_rounding():
    values = [round(0.1 * i, 1) for i in range(101)]  # 0.0 .. 10.0 by 0.1, stored as float32
    df = pl.DataFrame(
        {"user_id": range(101), "item_id": [1] * 101, "rating": values, "timestamp": [10**9] * 101},
        schema=CANONICAL_SCHEMA,
    )
    report = validate_ratings(df, rating_scale=(0.0, 10.0), rating_step=0.1, min_rows=101)
    assert report.success, report.summary()
    off = validate_ratings(
        _set(df, "rating", {50: 5.05}), rating_scale=(0.0, 10.0), rating_step=0.1, min_rows=0
    )
    assert _failed(off) == {"rating_on_step"}
    assert off["rating_on_step"].unexpected_examples == [{"row": 50, "rating": 5.05}]


def test_duplicated_pair_fails_unique_user_item(ratings, movielens_archive):
    again = ratings[5:6].with_columns(pl.lit(1.0, dtype=pl.Float32).alias("rating"))
    bad = pl.concat([ratings, again])
    pair = (ratings[5, "user_id"], ratings[5, "item_id"])
    report = validate_ratings(bad)
    assert _failed(report) == {"unique_user_item"}
    unique = report["unique_user_item"]
    assert unique.unexpected_count == 2  # both rows of the duplicated pair
    assert unique.unexpected_examples == [
        {"row": 5, "user_id": pair[0], "item_id": pair[1]},
        {"row": movielens_archive.ratings, "user_id": pair[0], "item_id": pair[1]},
    ]


def test_implausible_timestamps_fail_timestamp_plausible(ratings):
    year_2100 = 4_102_444_800
    report = validate_ratings(_set(ratings, "timestamp", {1: year_2100, 2: -5}))
    assert _failed(report) == {"timestamp_plausible"}
    ts = report["timestamp_plausible"]
    assert ts.unexpected_count == 2
    assert ts.unexpected_examples == [
        {"row": 1, "timestamp": year_2100},
        {"row": 2, "timestamp": -5},
    ]
    # explicit bounds are honoured: 2100 becomes plausible, -5 still is not
    bad = _set(ratings, "timestamp", {1: year_2100, 2: -5})
    wide = validate_ratings(bad, max_timestamp=year_2100)
    assert wide["timestamp_plausible"].unexpected_count == 1


def test_too_few_rows_fail_min_rows(ratings):
    report = validate_ratings(ratings.head(400))
    assert _failed(report) == {"min_rows"}
    rows = report["min_rows"]
    assert rows.unexpected_count == 600  # the shortfall
    assert rows.details["observed_value"] == 400
    assert "400 rows, fewer than min_rows=1000" in rows.message
    assert validate_ratings(ratings.head(400), min_rows=400).success


def test_raise_for_failure_is_one_line(ratings):
    validate_ratings(ratings).raise_for_failure()  # passes silently
    with pytest.raises(DataValidationError) as err:
        validate_ratings(ratings.head(10)).raise_for_failure("ml-latest-small ratings")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ml-latest-small ratings failed validation: min_rows: FAILED")


def test_suite_tags_every_expectation_with_its_check():
    import great_expectations as gx

    suite = ratings_suite(
        rating_scale=(1.0, 5.0), rating_step=1.0, min_rows=10, min_timestamp=0, max_timestamp=10**10
    )
    assert isinstance(suite, gx.ExpectationSuite)
    checks = [e.meta["flexmf_check"] for e in suite.expectations]
    assert set(checks) == set(CHECK_NAMES)
    types = {type(e).__name__ for e in suite.expectations}
    assert "ExpectCompoundColumnsToBeUnique" in types and "ExpectTableRowCountToBeBetween" in types
    no_step = ratings_suite(
        rating_scale=(1.0, 5.0), rating_step=None, min_rows=10, min_timestamp=0,
        max_timestamp=10**10,
    )
    assert "rating_on_step" not in {e.meta["flexmf_check"] for e in no_step.expectations}


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"rating_scale": (5.0, 0.5)}, "rating_scale"),
        ({"rating_step": 0.0}, "rating_step"),
        ({"min_rows": -1}, "min_rows"),
        ({"min_timestamp": 10, "max_timestamp": 5}, "min_timestamp"),
    ],
)
def test_bad_settings_raise_config_error(ratings, kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        validate_ratings(ratings.head(5), **kwargs)
