"""How a settings dataclass is read and checked: values coerced to each field's type from
YAML, JSON or flags, type and range problems collected (every one, so a user fixes a config
in one pass), and each field's docstring read as its `--help`.

saekit keeps this small module rather than a typed-CLI library (tyro, simple_parsing):
those build flags from dataclasses, but none collects every problem of every section into
one report, layers defaults, a config file and flags, and reads the same aliases in files
and flags as `saekit train` does.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import numbers
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid config; `problems` lists every problem found, one sentence each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid training config ({len(self.problems)} problem(s)):\n{lines}")


def check_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


class Bounds(typing.NamedTuple):
    """The range of a numeric field: low and high ends (None: open-ended), each included or
    not."""

    low: float | None
    low_included: bool = False
    high: float | None = None
    high_included: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (
            value < self.low or (value == self.low and not self.low_included)
        ):
            return False
        return self.high is None or value < self.high or (
            value == self.high and self.high_included
        )

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0:
                return ">= 0" if self.low_included else "positive"
            return f"{'at least' if self.low_included else 'greater than'} {_number(self.low)}"
        left = "[" if self.low_included else "("
        right = "]" if self.high_included else ")"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value}"


POSITIVE = Bounds(0)
NON_NEGATIVE = Bounds(0, low_included=True)


def _kind(hint: Any) -> str:
    """How a field's type reads in a problem ("a whole number", "true or false or null")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_kind(inner[0])} or null"
    if typing.get_origin(hint) is list:
        return f"a list in which each is {_kind(typing.get_args(hint)[0])}"
    return {int: "a whole number", float: "a finite number", bool: "true or false",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def fits_type(value: Any, hint: Any) -> bool:
    """Whether `value` is of the field type `hint`: bools only for bool fields, ints (not
    bools, not floats) for int fields, finite ints or floats for float fields."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits_type(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        inner = typing.get_args(hint)[0]
        return isinstance(value, list) and all(fits_type(v, inner) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    # numbers.Integral and numbers.Real take numpy's scalars too.
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value)
        )
    if hint is str:
        return isinstance(value, str)
    return True


def field_problems(section: Any, bounds: dict[str, Bounds]) -> list[str]:
    """A problem for every field of `section` whose value is not of its type (NaN and
    infinity are no value a setting can take) or is outside its `bounds` (which a list
    field's every element must keep)."""
    hints = _hints(type(section))
    out = []
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if not fits_type(value, hint):
            out.append(f"{f.name} must be {_kind(hint)}, got {value!r}")
            continue
        limit = bounds.get(f.name)
        values = value if isinstance(value, list) else [value]
        if limit is not None and any(v is not None and not limit.holds(v) for v in values):
            out.append(f"{f.name} must be {limit.describe()}, got {value!r}")
    return out


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def read_config_file(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML or JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, found {type(data).__name__}")
    return data


def suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"


def coerce_fields(
    cls: type, values: dict[str, Any], section: str
) -> tuple[dict[str, Any], list[str]]:
    """Values converted to each field's type, and a problem for each that cannot be."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{section}: unknown field {key!r}{suggest(key, names)}")
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except (TypeError, ValueError):
            problems.append(
                f"{section}.{key}: expected {_type_name(hints[key])}, got {value!r}"
            )
    return kwargs, problems


def coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int, float, str, bool, list[int] and their optional forms)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, (list, tuple)):
            # A list for a field that takes one value or a list (hook_name): the list form.
            inner = [a for a in inner if typing.get_origin(a) is list] or inner
        return coerce(value, inner[0])
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return [coerce(v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError(value)
    if hint is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        if not isinstance(value, int):
            raise TypeError(value)
        return value
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
