"""Dataclass configs loaded from YAML with dotted command-line overrides (``key.sub=value``).

Recipes declare a (nested) dataclass whose fields carry their help text in
``field(metadata={"help": ...})`` and validate combinations in ``__post_init__``.
:func:`load_config` reads YAML, applies overrides, and builds the dataclass, rejecting unknown
keys with the full dotted name so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.lora=true"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key.sub=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is set both as a value and as a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub and isinstance(value, dict):
            # start from the field's own default (a default_factory may differ from sub's defaults)
            factory = fields[name].default_factory
            default = factory() if factory is not dataclasses.MISSING else None
            base = to_dict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[name] = from_dict(sub, merge(base, value), f"{prefix}{name}.")
        elif isinstance(value, dict) and isinstance(default := _field_default(fields[name]), dict):
            # a dict field with default contents (e.g. the demo's prefs/dpo settings): a dotted
            # override such as ``dpo.train.lr=1e-5`` changes that key, it does not drop the rest
            kwargs[name] = merge(default, value)
        else:
            kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(hint, value, key: str):
    """Numbers YAML 1.1 reads as strings (``1e-5`` has no dot, so it stays a str) become numbers."""
    if isinstance(value, str) and hint in (float, float | None, int, int | None):
        target = float if hint in (float, float | None) else int
        try:
            return target(value)
        except ValueError:
            raise ValueError(f"{key}: expected {target.__name__}, got {value!r}") from None
    if hint in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _dataclass_type(hint) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> validated dataclass instance."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return from_dict(cls, merge(data, parse_overrides(overrides or [])))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
