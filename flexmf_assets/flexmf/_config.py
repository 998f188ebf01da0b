"""Shared machinery of the typed, validated config classes (explicit and implicit)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping, TypeVar

from flexmf_assets.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{cls_name}.{field}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{field}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{cls_name}.{field}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{field}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{cls_name}.{field}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{cls_name}.{field}: expected a string, got {value!r}")
    return value


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
        for key in data:
            if key not in valid:
                raise ConfigError(
                    f"{prefix}unknown {cls.__name__} field {key!r}{suggest(key, valid)}; "
                    f"valid fields: {', '.join(valid)}"
                )
        try:
            data = cls._preprocess(data)
            hints = typing.get_type_hints(cls)
            kwargs = {k: _coerce(cls.__name__, k, hints[k], v) for k, v in data.items()}
            return cls(**kwargs)  # type: ignore[call-arg]
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None

    def _check_common(self, *, positive_ints: tuple[str, ...] = ()) -> None:
        """Range checks shared by the scorer configs (sizes, learning rate, penalties, patience)."""
        name = type(self).__name__
        for field in ("embedding_size", "batch_size", "epochs", *positive_ints):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}.{field}: must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:  # type: ignore[attr-defined]
            raise ConfigError(f"{name}.learning_rate: must be > 0, got {self.learning_rate!r}")  # type: ignore[attr-defined]
        for field in ("regularization", "init_scale"):
            if not getattr(self, field) >= 0:
                raise ConfigError(f"{name}.{field}: must be >= 0, got {getattr(self, field)!r}")
        if self.reg_method not in ("L2", "AdamW", None):  # type: ignore[attr-defined]
            raise ConfigError(f"{name}.reg_method: {self.reg_method!r} is not one of 'L2', 'AdamW', None")  # type: ignore[attr-defined]
        patience = self.patience  # type: ignore[attr-defined]
        if patience is not None and (isinstance(patience, bool) or patience < 1):
            raise ConfigError(f"{name}.patience: must be >= 1 or None, got {patience!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: T, **changes: Any) -> T:
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def parse_overrides(cls, key: str) -> dict[str, Any]:
        """Parse a partition key such as ``embedding_size=64,loss=pairwise`` into raw overrides.

        Raises :class:`ConfigError` listing the valid fields when the key does not parse.
        """
        valid = cls.field_names()
        out: dict[str, Any] = {}
        for part in key.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(
                    f"hparams key {key!r}: {part!r} is not of the form field=value; "
                    f"valid {cls.__name__} fields: {', '.join(valid)}"
                )
            name, _, raw = part.partition("=")
            name, raw = name.strip(), raw.strip()
            if name not in valid:
                raise ConfigError(
                    f"hparams key {key!r}: unknown field {name!r}{suggest(name, valid)}; "
                    f"valid {cls.__name__} fields: {', '.join(valid)}"
                )
            out[name] = None if raw.lower() in ("none", "null") else raw
        if not out:
            raise ConfigError(
                f"hparams key {key!r} is empty; valid {cls.__name__} fields: {', '.join(valid)}"
            )
        return out
