"""The base of every typed, validated settings class (scorer configs, split, synthetic data):
:class:`ConfigBase` (``from_dict`` with typo suggestions, range checks, ``to_dict``), the ranges
the scorer configs enforce, and the partition-key grammar (``field=value;...``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Iterable, Literal, Mapping, Sequence, TypeVar

from flexmf_assets.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")

#: how ``regularization`` applies (see the scorer configs); ``None`` disables it
RegMethod = Literal["L2", "AdamW"]
#: how a scorer is trained: minibatch gradients (``optimizer``, ``learning_rate``, ...) or alternating
#: least squares (:mod:`.als`)
Solver = Literal["sgd", "als"]


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_known(names: Iterable[Any], valid: Sequence[str], *, prefix: str, what: str = "key",
                listed: str = "keys") -> None:
    """Raise the one-line :class:`ConfigError` for the first of ``names`` not in ``valid``:
    ``<prefix>unknown <what> 'x' (did you mean 'y'?); valid <listed>: a, b, c``."""
    for name in names:
        if name not in valid:
            raise ConfigError(f"{prefix}unknown {what} {name!r}{suggest(str(name), list(valid))}; "
                              f"valid {listed}: {', '.join(valid)}")


def _coerce(cls_name: str, field: str, annotation: Any, value: Any) -> Any:
    """Check/convert ``value`` against a simple annotation (int, float, bool, str, Literal, Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(cls_name, field, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{cls_name}.{field}: invalid value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{cls_name}.{field}: {value!r} is not one of {', '.join(repr(a) for a in args)}"
        )
    # strict: flexmf.yaml gives typed YAML scalars (a boolean is true/false, not "false"); keys are
    # parsed to typed values by parse_overrides before they get here
    if annotation in _SCALARS:
        expected, ok = _SCALARS[annotation]
        if not ok(value):
            raise ConfigError(f"{cls_name}.{field}: expected {expected}, got {value!r}")
        return float(value) if annotation is float else value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: annotation -> (what a value must be, the check): booleans are not integers, numbers are finite
_SCALARS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: _is_number(v) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
}


#: field -> (lower bound, upper bound, lower bound excluded): the ranges every scorer config enforces
#: (the upper bounds refuse settings that would run for days or overflow, with one line)
RANGES: dict[str, tuple[float, float, bool]] = {
    "embedding_size": (1, 4096, False),
    "batch_size": (1, 2**24, False),
    "epochs": (1, 10_000, False),
    "learning_rate": (0, 1000, True),
    "regularization": (0, 1e6, False),
    "init_scale": (0, 100, False),
    "lr_decay": (0, 1, True),
    "seed": (0, 2**32 - 1, False),
    "patience": (1, 10_000, False),
    "negative_count": (1, 1000, False),
    "misranked_candidates": (1, 10_000, False),
    "positive_weight": (0, 1e6, True),
    "eval_k": (1, 1000, False),
    "min_rating": (-1e6, 1e6, False),
    # alternating least squares (solver: als)
    "reg_exponent": (0, 4, False),
    "bias_regularization": (0, 1e6, False),
    "damping": (0, 1e6, False),
    "weight": (0, 1e6, False),
    "epsilon": (0, 1e6, True),
    "cg_steps": (1, 1000, False),
}


def _bound(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


#: fields that may be None (``patience``: train all epochs; ``min_rating``: keep every rating); so may
#: any field whose default is None
OPTIONAL_RANGES = ("patience", "min_rating")


class ConfigBase:
    """Mixin for frozen dataclasses: ``from_dict`` with typo suggestions, ``to_dict``, key parsing.

    Subclasses are ``@dataclass(frozen=True)`` and validate ranges in ``__post_init__`` by raising
    :class:`ConfigError` with the field name in the message.
    """

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _preprocess(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook for subclasses (e.g. presets that fill other fields)."""
        return data

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
        """Build a config from a mapping; unknown keys and wrong types raise :class:`ConfigError`.

        ``where`` prefixes the message (e.g. ``"flexmf.yaml explicit_hparams.tuned"``).
        """
        data = dict(data or {})
        prefix = f"{where}: " if where else ""
        valid = cls.field_names()
        check_known(data, valid, prefix=prefix, what=f"{cls.__name__} field", listed="fields")
        try:
            data = cls._preprocess(data)
            hints = typing.get_type_hints(cls)
            kwargs = {k: _coerce(cls.__name__, k, hints[k], v) for k, v in data.items()}
            return cls(**kwargs)  # type: ignore[call-arg]
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None

    def _check_common(self) -> None:
        """Range checks shared by the scorer configs: every numeric field within :data:`RANGES`."""
        name = type(self).__name__
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for field, (low, high, low_open) in RANGES.items():
            if not hasattr(self, field):
                continue
            value = getattr(self, field)
            if value is None and (field in OPTIONAL_RANGES or defaults.get(field, 0) is None):
                continue  # optional, or left unset for the solver that does not read it
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}.{field}: expected a number, got {value!r}")
            too_low = value <= low if low_open else value < low
            if too_low or value > high:
                bound = f"> {_bound(low)}" if low_open else f">= {_bound(low)}"
                raise ConfigError(f"{name}.{field}: must be {bound} and <= {_bound(high)}, got {value!r}")
        reg_method = getattr(self, "reg_method", None)
        if reg_method not in (*typing.get_args(RegMethod), None):
            raise ConfigError(f"{name}.reg_method: {reg_method!r} is not one of 'L2', 'AdamW', None")

    def _check_solver(self, only: Mapping[str, tuple[str, ...]],
                      neutral: Mapping[str, tuple[Any, ...]] | None = None) -> None:
        """``solver`` is one of ``only``'s keys, and no field that only the OTHER solvers read is set:
        each must keep its default (or a value of ``neutral[field]``, which changes nothing either),
        so a setting that would be ignored is refused in one line (a neutral value becomes the default:
        equal models have equal configurations)."""
        name = type(self).__name__
        solver = getattr(self, "solver")
        if solver not in only:
            raise ConfigError(f"{name}.solver: {solver!r} is not one of {', '.join(map(repr, only))}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for other, fields in only.items():
            for field in fields if other != solver else ():
                value = getattr(self, field)
                if value != defaults[field] and value not in (neutral or {}).get(field, ()):
                    raise ConfigError(f"{name}.{field}: applies only to solver {other!r}, not to "
                                      f"solver {solver!r}; leave it out (got {value!r})")
                object.__setattr__(self, field, defaults[field])  # a neutral value: one spelling

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: T, **changes: Any) -> T:
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def parse_overrides(cls, key: str) -> dict[str, Any]:
        """Parse a partition key such as ``embedding_size=64;loss=pairwise`` into typed overrides.

        The grammar (:func:`check_key_syntax`): ``field=value`` pairs separated by ``;`` (``,`` as
        written by earlier versions still parses), ASCII letters, digits and ``_ . = ; , + -`` only,
        each field once, values as literals of the field's type (``none`` for an empty optional).
        Raises :class:`ConfigError` naming the field at fault and listing the valid ones.
        """
        check_key_syntax(key)
        valid = cls.field_names()
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for part in split_key(key):
            name, eq, raw = part.partition("=")
            if not eq or not name:
                raise ConfigError(f"hparams key {key!r}: {part!r} is not of the form field=value; "
                                  f"valid {cls.__name__} fields: {', '.join(valid)}")
            check_known([name], valid, prefix=f"hparams key {key!r}: ", what="field",
                        listed=f"{cls.__name__} fields")
            if name in out:
                raise ConfigError(f"hparams key {key!r}: field {name!r} is given twice")
            out[name] = _parse_literal(key, name, hints[name], raw)
        return out

    @classmethod
    def canonical_key(cls, overrides: Mapping[str, Any]) -> str:
        """The one spelling of ``overrides`` as a key: fields in declaration order, literals canonical."""
        order = cls.field_names()
        return KEY_SEPARATOR.join(f"{name}={format_literal(overrides[name])}"
                                  for name in order if name in overrides)


# -- partition-key grammar ---------------------------------------------------------------------
#: fields of a key are separated by ``;`` (Dagster's "Add a partition" dialog refuses ``,``)
KEY_SEPARATOR = ";"
LEGACY_SEPARATOR = ","
#: a key is one path component of the storage layout (255 bytes on most file systems)
MAX_KEY_LENGTH = 200
_KEY_CHAR = re.compile(r"[A-Za-z0-9_.=;,+-]")
_INT_TEXT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def check_key_syntax(key: Any, what: str = "hparams key") -> None:
    """A partition key (a set name or ``field=value`` overrides) is non-empty printable ASCII
    without whitespace, ``|``, ``/`` or ``..``, at most :data:`MAX_KEY_LENGTH` characters."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{what} {key!r}: must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ConfigError(f"{what} {key[:40]!r}... is {len(key)} characters long; at most "
                          f"{MAX_KEY_LENGTH} are allowed (a key is a folder name in the storage)")
    for pos, char in enumerate(key):
        if not _KEY_CHAR.fullmatch(char):
            visible = char.isascii() and char.isprintable() and not char.isspace()
            shown = repr(char) if visible else f"U+{ord(char):04X} {char!r}"
            raise ConfigError(f"{what} {key!r}: character {shown} at position {pos + 1} is not allowed; "
                              "use ASCII letters, digits and _ . = ; + - only (fields separated by ';')")
    if ".." in key or key[0] in ".;,=" or key[-1] in ";,=":
        raise ConfigError(f"{what} {key!r}: must not start with '.', ';', ',' or '=', end with ';', ',' "
                          "or '=', or contain '..'")


def split_key(key: str) -> list[str]:
    """The ``field=value`` parts of a key: split on ``;``, or on ``,`` for keys of earlier versions."""
    if KEY_SEPARATOR in key and LEGACY_SEPARATOR in key:
        raise ConfigError(f"hparams key {key!r}: mixes ';' and ','; separate fields with ';' only")
    parts = key.split(KEY_SEPARATOR if KEY_SEPARATOR in key else LEGACY_SEPARATOR)
    if any(not p for p in parts):
        raise ConfigError(f"hparams key {key!r}: has an empty field (two separators in a row)")
    return parts


def _parse_literal(key: str, field: str, annotation: Any, raw: str) -> Any:
    """The typed value of ``raw`` for a field annotated ``annotation`` (one canonical literal each)."""
    if raw.lower() in ("none", "null"):
        return None
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kinds = {typing.get_origin(a) or a for a in args}
    if bool in kinds:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if raw in words:  # a boolean or a word (explicit ``bias``: true, false, learned, damped)
            return raw
        alternatives = f" (nor one of {', '.join(map(repr, words))})" if words else ""
        raise ConfigError(f"hparams key {key!r}: {field}={raw} is not true or false{alternatives}")
    if int in kinds:
        if _INT_TEXT.fullmatch(raw):
            return int(raw)
        raise ConfigError(f"hparams key {key!r}: {field}={raw} is not an integer (plain digits, "
                          "no leading zeros)")
    if float in kinds:
        value = float(raw) if _FLOAT_TEXT.fullmatch(raw) else None
        if value is None or not math.isfinite(value):
            raise ConfigError(f"hparams key {key!r}: {field}={raw} is not a finite number")
        return value
    return raw  # strings and Literal choices: checked by from_dict


def format_literal(value: Any) -> str:
    """How a value is written in a key (the inverse of :func:`_parse_literal`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
