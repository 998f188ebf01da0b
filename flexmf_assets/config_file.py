"""Reading and checking ``flexmf.yaml``: a safe YAML loader (no Python objects, no alias bombs, no
runaway nesting) and the schema of every scalar field, with one-line errors naming the field.

No Dagster import here (Dagster's cron validator is mirrored by :func:`valid_cron`; a test keeps the two
in step).
"""

from __future__ import annotations

import math
import re
import reprlib
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from flexmf_assets.errors import ConfigError
from flexmf_assets.flexmf.config_base import check_known

MAX_YAML_NODES = 100_000  # YAML values after alias expansion (an alias bomb is refused)
MAX_YAML_DEPTH = 100  # nesting levels of the YAML document

_TOP_KEYS = (
    "default_dataset", "datasets", "split", "download", "device", "recommendations",
    "explicit_hparams", "implicit_hparams", "explicit_grid", "implicit_grid", "sweep", "schedule",
    "validation", "dataset_partitions", "tune",
)


# -- the schema: every scalar field of flexmf.yaml with its type and range ------------------

@dataclass(frozen=True)
class Rule:
    """What a field accepts: ``expected`` in words (for the error) and the test ``ok``."""

    expected: str
    ok: Callable[[Any], bool]
    nullable: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(minimum: int | None = None, *, nullable: bool = False, unit: str = "") -> Rule:
    words = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    return Rule(words + (f" ({unit})" if unit else "") + (" or null" if nullable else ""),
                lambda v: _is_int(v) and (minimum is None or v >= minimum), nullable)


def _number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, nullable: bool = False) -> Rule:
    if high is None:
        words = "a positive number" if (low, low_open) == (0, True) else "a finite number"
    else:
        words = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v: Any) -> bool:
        return (_is_number(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Rule(words + (" or null" if nullable else ""), ok, nullable)


def _bool() -> Rule:
    return Rule("true or false (a YAML boolean, unquoted)", lambda v: isinstance(v, bool))


def _string(words: str = "a string", check: Callable[[str], bool] = bool) -> Rule:
    return Rule(words, lambda v: isinstance(v, str) and check(v))


def _choice(*values: str) -> Rule:
    return Rule(f"one of {', '.join(values)}", lambda v: isinstance(v, str) and v in values)


def _string_list(words: str) -> Rule:
    return Rule(words, lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v))


_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (low, high, names) per field: minute, hour, day of month, month, day of week
_CRON_FIELDS = ((0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, _MONTHS), (0, 7, _WEEKDAYS))


def _cron_field(text: str, index: int) -> set[int] | None:
    """The values one cron field matches (``index`` 0-4: minute ... weekday), None when invalid."""
    low, high, names = _CRON_FIELDS[index]
    if (index in (2, 4) and text == "?" or index == 2 and text.upper() == "L"
            or index == 4 and re.fullmatch(r"[0-7]#[1-5]|[lL][0-7]", text)):
        return set(range(low, high + 1))  # these stand alone: no list, range or step

    def value(token: str) -> int | None:
        if token.lower() in names:
            return names.index(token.lower()) + (1 if names is _MONTHS else 0)
        return int(token) if token.isascii() and token.isdigit() and low <= int(token) <= high else None

    matched: set[int] = set()
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if slash and not (step.isascii() and step.isdigit() and int(step) > 0):
            return None
        ends = [low, high] if base == "*" else [value(t) for t in base.split("-")]
        if len(ends) > 2 or None in ends:
            return None
        first, last = ends[0], ends[1] if len(ends) == 2 else (high if slash else ends[0])
        span = range(first, last + 1) if first <= last else [*range(first, high + 1), *range(low, last + 1)]
        matched.update(list(span)[:: int(step) if slash else 1])
    return matched


def valid_cron(text: str) -> bool:
    """True for a 5-field cron string (or an ``@daily``-style macro) a Dagster schedule accepts.

    Fields: ``*``, values, ``a-b`` ranges, ``/step``, comma lists, month and weekday names; alone in
    a field, ``?`` and ``L`` (days), ``d#n`` and ``Ld`` (weekday). A date that never comes (the 30th
    of February) is refused. A test keeps this in step with Dagster's own validator (which would
    mean importing Dagster here).
    """
    if text.strip() in _CRON_MACROS:
        return True
    fields = text.split()
    if len(fields) != 5:
        return False
    values = [_cron_field(f, i) for i, f in enumerate(fields)]
    if any(v is None for v in values):
        return False
    return not (values[3] == {2} and values[2] <= {30, 31})


def valid_timezone(name: str) -> bool:
    """True for an IANA time zone name (``UTC``, ``Europe/Paris``), as Dagster schedules take."""
    if name in ("UTC", "utc"):
        return True
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


# section -> field -> rule; "" is the top level. A section's keys are its valid keys. Mappings
# (datasets, hparams sets, grids) are checked by their own code; cross-field rules of `split` and
# the device names by SplitConfig and DeviceSettings, at load too.
SCHEMA: dict[str, dict[str, Rule]] = {
    "": {"default_dataset": _string("a dataset name (a string)")},
    "split": {
        "protocol": _choice("random", "user_holdout", "temporal"),
        "test_fraction": _number(0, 1, low_open=True, high_open=True),
        "validation_fraction": _number(0, 1, high_open=True),
        "holdout_n": _int(1, nullable=True),
        "holdout_fraction": _number(0, 1, low_open=True, high_open=True, nullable=True),
        "cutoff": _int(nullable=True),
        "last_n": _int(1, nullable=True),
        "seed": _int(0),
    },
    "download": {
        "timeout": _number(0, low_open=True),
        "retries": _int(0),
        "allowed_file_roots": _string_list("a list of paths"),
        "max_bytes": _int(1, nullable=True, unit="bytes"),  # null: the default cap
    },
    "device": {
        "device": _string("a device name (a string: auto, cpu, cuda, cuda:N or mps)"),
        "threads": _int(1, nullable=True),
        "matmul_precision": _choice("highest", "high", "medium"),
        "allow_fallback": _bool(),
    },
    "recommendations": {"n": _int(1)},
    "validation": {"min_rows": _int(1, nullable=True)},
    "sweep": {"datasets": _string_list("a list of dataset names")},
    "schedule": {
        "cron": _string("a 5-field cron string such as '0 3 * * 1' (minute hour day month weekday)",
                        valid_cron),
        "timezone": _string("an IANA time zone name such as 'UTC' or 'Europe/Paris'", valid_timezone),
        "enabled": _bool(),
    },
}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


#: how a value of each YAML type is named in an error (bool before int: a bool is an int)
_TYPE_WORDS: tuple[tuple[type | tuple[type, ...], Callable[[Any], str]], ...] = (
    (bool, lambda v: f"the boolean {str(v).lower()}"),
    (int, lambda v: f"the integer {_short.repr(v)}"),
    (float, lambda v: f"the number {v!r}"),
    (str, lambda v: f"the string {_short.repr(v)}"),
    (list, lambda v: f"a list {_short.repr(v)}"),
    (Mapping, lambda v: f"a mapping {_short.repr(dict(v))}"),
)


def _describe(value: Any) -> str:
    """``the string '/srv/data'``, ``the integer 3``, ``a list ['x']``: short and on one line."""
    if value is None:
        return "null"
    words = next((word for kind, word in _TYPE_WORDS if isinstance(value, kind)), None)
    return words(value) if words else f"{type(value).__name__} {_short.repr(value)}"


def _check_fields(where: str, data: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> None:
    for key, value in data.items():
        rule = rules.get(key)
        if rule is not None and not ((value is None and rule.nullable) or rule.ok(value)):
            raise ConfigError(f"{where} {prefix}{key}: expected {rule.expected}, got {_describe(value)}")


def _section(where: str, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping ``raw[name]`` with its keys and every field checked against :data:`SCHEMA`."""
    rules = SCHEMA[name]
    data = _mapping(f"{where} {name}", raw.get(name))
    _check_keys(f"{where} {name}", data, tuple(rules))
    _check_fields(where, data, rules, f"{name}.")
    return data


# -- reading the file ----------------------------------------------------------------------

class _Refused(Exception):
    """A YAML document :func:`_read_yaml` will not build (the message says why)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than :data:`MAX_YAML_DEPTH` (scanning deep
    ``[[[...`` is quadratic, composing it recursive) and notes whether the document uses aliases."""

    aliased = False
    depth = 0

    def fetch_flow_collection_start(self, token_class):  # type: ignore[no-untyped-def]
        super().fetch_flow_collection_start(token_class)
        if self.flow_level > MAX_YAML_DEPTH:
            raise _Refused(f"line {self.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self.aliased = True
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"line {self.peek_event().start_mark.line + 1}: nested deeper than "
                               f"{MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Values in the document with every alias expanded, counted without expanding (stops past ``limit``)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > limit:
                return sizes[id(node)]
        elif id(node) not in sizes:
            sizes[id(node)] = 0  # an alias of an enclosing node (a recursive structure) counts 0
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _read_yaml(path: Path) -> Any:
    """Parse ``path`` safely: plain data only (no Python objects), nesting deeper than
    :data:`MAX_YAML_DEPTH` and aliases expanding past :data:`MAX_YAML_NODES` values (an alias
    bomb) refused before anything is built."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if loader.aliased and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise _Refused(f"aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(f"{path}: YAML {exc}; refused") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = " ".join(" ".join(str(p) for p in parts if p).split()) or " ".join(str(exc).split())
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def _check_keys(where: str, data: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    check_known(data, valid, prefix=f"{where}: ")


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
    return dict(value)


