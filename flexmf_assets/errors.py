"""Error types shared by the core library.

Every error carries a one-line message that names the file, row or setting at fault, so that a
Dagster run failure or a CLI error reads as one sentence rather than a traceback.
"""

from __future__ import annotations


class FlexMFError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FlexMFError, ValueError):
    """A configuration value (flexmf.yaml, a hyperparameter set, a partition key) is invalid."""


class DownloadError(FlexMFError):
    """An archive could not be fetched (HTTP error, timeout, refused scheme...)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match the expected size or sha256."""


class ArchiveError(FlexMFError):
    """An archive is unreadable or unsafe (not a zip, traversal, bomb, missing member)."""


class ParseError(FlexMFError, ValueError):
    """A ratings/items file has a malformed row; the message names the file and line."""


class DataValidationError(FlexMFError, ValueError):
    """Data failed a validation rule (split leaves nothing to train on, ...)."""


class TrainingError(FlexMFError, RuntimeError):
    """Training failed (diverged to NaN/inf, out of memory...); the message names the epoch or setting."""
