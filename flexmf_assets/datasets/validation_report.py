"""The outcome of validating a ratings frame: one :class:`ExpectationOutcome` per named check,
gathered in a :class:`ValidationReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexmf_assets.datasets.validation_suite import CHECK_NAMES
from flexmf_assets.errors import DataValidationError


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one named check (one or more GX expectations)."""

    check_name: str  #: stable snake_case name, the Dagster asset-check name
    description: str  #: one line a user reads in the UI
    success: bool
    unexpected_count: int
    unexpected_examples: list = field(default_factory=list)  #: up to 10 offending values/rows
    details: dict = field(default_factory=dict)  #: observed values etc., JSON-serialisable

    @property
    def message(self) -> str:
        """One line: ``'rating_in_scale: FAILED (2 unexpected, e.g. ...)'``."""
        if self.success:
            return f"{self.check_name}: passed"
        keys = ("not_evaluated", "error", "reason")
        reason = next((self.details[k] for k in keys if self.details.get(k)), None)
        if reason:
            return f"{self.check_name}: FAILED ({reason})"
        examples = ", ".join(_short(e) for e in self.unexpected_examples[:3])
        more = f", e.g. {examples}" if examples else ""
        return f"{self.check_name}: FAILED ({self.unexpected_count} unexpected{more})"


@dataclass(frozen=True)
class ValidationReport:
    """All check outcomes of one validation, in :data:`CHECK_NAMES` order."""

    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def __getitem__(self, check_name: str) -> ExpectationOutcome:
        for outcome in self.outcomes:
            if outcome.check_name == check_name:
                return outcome
        raise KeyError(f"no check named {check_name!r}; checks are {', '.join(CHECK_NAMES)}")

    def summary(self) -> str:
        """One line naming every failed check (or saying that all passed)."""
        if self.success:
            return f"all {len(self.outcomes)} ratings checks passed"
        return "; ".join(o.message for o in self.failed)

    def raise_for_failure(self, source: str = "ratings") -> None:
        """Raise :class:`DataValidationError` with a one-line message when a check failed."""
        if not self.success:
            raise DataValidationError(f"{source} failed validation: {self.summary()}")


def _short(example: Any) -> str:
    if isinstance(example, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in example.items()) + ")"
    return str(example)


__all__ = ["ExpectationOutcome", "ValidationReport"]
