"""Typed, frozen configuration dataclasses loadable from YAML/JSON with strict validation.

Every component config is a `@dataclass(frozen=True, kw_only=True)` subclass of `Config`.
`Config.from_dict` rejects unknown keys (naming the valid ones), checks `Literal` choices and
basic types, and builds nested configs. Precedence is defaults < file < `--set a.b=v` overrides.

Example:
    >>> from dataclasses import dataclass
    >>> from typing import Literal
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Opt(Config):
    ...     name: Literal["adam", "sgd"] = "adam"
    ...     lr: float = 1e-3
    >>> Opt.from_dict({"lr": 0.1}).lr
    0.1
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from ldiffusion.core.errors import ConfigError
from ldiffusion.core.registry import suggest

C = TypeVar("C", bound="Config")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = list(get_args(tp))
        if value is None and "none" in choices:  # `--set key=none` parses to None; the choice is the string
            return "none"
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {choices}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {args}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} should be a list")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r} should have {len(args)} items")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            sub = args[0] if args else Any
            items = [_coerce(v, sub, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} should be a mapping")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} should be a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} should be a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}={str(value)[:40]} should be a finite number")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} should be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} should be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} should be a string")
        return value
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base class of all configs: strict `from_dict`, `to_dict`, `replace` and file loading."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
        """Build from a mapping; unknown keys and invalid values raise `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or cls.__name__} should be a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in fields]
        if unknown:
            k = unknown[0]
            raise ConfigError(
                f"unknown config key {prefix + k!r}; valid keys are {sorted(fields)}"
                f"{suggest(k, list(fields))}"
            )
        kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix or cls.__name__}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""

        def conv(v: Any) -> Any:
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    def replace(self: C, **changes: Any) -> C:
        """Return a copy with `changes` applied and validated."""
        d = self.to_dict()
        d.update({k: (v.to_dict() if isinstance(v, Config) else v) for k, v in changes.items()})
        return type(self).from_dict(d)

    @classmethod
    def from_file(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
        """Load from a .json/.yaml file, then apply `a.b=v` overrides."""
        data = load_mapping(path)
        return cls.from_dict(apply_overrides(data, overrides or []))


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> None:
    """Raise `ConfigError` when `value` lies outside [lo, hi] (or (lo, hi] with `lo_open`)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        left = "(" if lo_open else "["
        raise ConfigError(f"{key}={value!r} is out of range; expected {left}{lo}, {hi}]")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping from `path` (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # parse errors from either library
        raise ConfigError(f"{path}: cannot parse ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _not_finite(text: str) -> Any:
    raise ConfigError(f"value {text!r} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _not_finite(text)


def parse_value(text: str) -> Any:
    """Parse an override value: JSON if it parses (numbers, bools, lists), else the raw string.

    Raises:
        ConfigError: NaN, Infinity or a number that overflows (1e999), or lists nested too deeply.
    """
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_not_finite)
    except RecursionError:
        raise ConfigError(f"value {text[:20]!r}... nests lists or mappings too deeply") from None
    except ValueError:  # not JSON (or an integer too long to convert): the raw text
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=v` overrides to a nested mapping (returns a new mapping)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} should look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = parse_value(raw.strip())
        except ConfigError as e:
            raise ConfigError(f"override {key.strip()!r}: {e}") from None
    return out
