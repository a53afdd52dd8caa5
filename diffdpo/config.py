"""Dataclass configs loaded from YAML with dotted command-line overrides (``key.sub=value``).

Recipes declare a (nested) dataclass whose fields carry their help text in
``field(metadata={"help": ...})`` and validate combinations in ``__post_init__``.
:func:`load_config` reads YAML, applies overrides, and builds the dataclass, rejecting unknown
keys with the full dotted name so a typo never silently falls back to a default, and values of
the wrong type (``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``tuple[...]``, ``dict``,
``Literal[...]``, ``X | None``) with the key, the expected type and the value. Every such mistake
(and a ``ValueError`` from a ``__post_init__``) is a :class:`diffdpo.errors.ConfigError`, which the
``diffdpo`` command and the recipes report as one line with exit code 2 (see :mod:`diffdpo.errors`).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffdpo.errors import ConfigError, ConfigFileNotFoundError, run_main  # noqa: F401  (run_main: for recipes)

T = TypeVar("T")


_YAML11_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.lora=true"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and as a section", [key])
        try:
            # YAML 1.1 reads yes/no/on/off as booleans; on the command line the text is kept, so that
            # ``train.mixed_precision=no`` sets the string "no" (a bool field still accepts it, see _coerce)
            node[leaf] = raw if raw.lower() in _YAML11_BOOL_WORDS else yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})", [key]) from None
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
    """Build dataclass ``cls`` from a nested dict, recursing into dataclass-typed fields.

    Raises :class:`ConfigError` naming the dotted key for an unknown key, a missing required key, a
    value of the wrong type, or a ``ValueError`` raised by the dataclass's ``__post_init__``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}",
                          [prefix.rstrip(".")] if prefix else [])
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = [prefix + k for k in unknown]
        raise ConfigError(f"unknown config key(s) {keys}; valid{' in ' + prefix.rstrip('.') if prefix else ''}: "
                          f"{sorted(fields)}", keys)
    missing = [prefix + n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s) {missing}", missing)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub and isinstance(value, dict):
            # start from the field's own default (a default_factory may differ from sub's defaults)
            factory = fields[name].default_factory
            default = factory() if factory is not dataclasses.MISSING else None
            base = to_dict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[name] = from_dict(sub, merge(base, value), f"{prefix}{name}.")
        elif sub:
            if not (value is None and _allows_none(hints[name])) and not isinstance(value, sub):
                raise ConfigError(f"{prefix}{name}: expected a mapping of {sub.__name__} settings, got "
                                  f"{_show(value)}", [prefix + name])
            kwargs[name] = value
        elif isinstance(value, dict) and isinstance(default := _field_default(fields[name]), dict):
            # a dict field with default contents (e.g. the demo's prefs/dpo settings): a dotted
            # override such as ``dpo.train.lr=1e-5`` changes that key, it does not drop the rest
            kwargs[name] = merge(default, value)
        else:
            kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__'s validation
        message = str(e)
        scope = prefix.rstrip(".")
        if scope and scope not in message:
            message = f"{scope}: {message}"
        raise ConfigError(message) from e


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(hint, value, key: str):
    """Check ``value`` against the field's type hint and convert where YAML is loose.

    Numbers YAML 1.1 reads as strings (``1e-5`` has no dot, so it stays a str) become numbers, an
    int becomes a float for a float field, a number becomes a str for a str field; anything else of
    the wrong type raises :class:`ConfigError`. Hints this does not know pass the value through.
    """
    if isinstance(value, os.PathLike):  # set from code (from_dict with a Path)
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, key)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOL_WORDS:
            return _YAML11_BOOL_WORDS[value.lower()]
        raise _type_error(key, "true or false", value)
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _type_error(key, "int", value) from None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
        raise _type_error(key, "int", value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _type_error(key, "float", value) from None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, "float", value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value} (YAML reads an unquoted yes/no/on/off as a "
                              f"boolean: quote it)", [key])
        raise _type_error(key, "a string", value)
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _type_error(key, "a mapping", value)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, "a list", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _type_error(key, f"a list of {len(args)} values", value)
            items = [_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        elif args:
            items = [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return type(value)(items)
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint_text = " (YAML reads an unquoted yes/no/on/off as a boolean: quote it)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: {_show(value)} is not one of {list(args)}{hint_text}", [key])
    return value


def _type_error(key: str, expected: str, value) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {_show(value)}", [key])


def _show(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, str) else text


def _allows_none(hint) -> bool:
    return type(None) in typing.get_args(hint)


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
    """YAML file (optional) + dotted overrides -> validated dataclass instance.

    Every mistake raises :class:`ConfigError` saying where it is: the file (and for YAML syntax the
    line), or the command-line override that set the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "not found"
            raise ConfigFileNotFoundError(f"config file {what}: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    overrides = list(overrides or [])
    try:
        return from_dict(cls, merge(data, parse_overrides(overrides)))
    except ConfigError as e:
        where = _where(e, path, overrides)
        if where is None:
            raise
        located = ConfigError(f"{where}: {e}", e.keys)
        raise located from e


def _where(error: ConfigError, path: Path | None, overrides: list[str]) -> str | None:
    """The override that set one of ``error.keys``, else the config file; None when nothing to add."""
    message = str(error)
    if message.startswith("override "):
        return None
    for item in overrides:
        key = item.partition("=")[0]
        for bad in error.keys:
            if key == bad or bad.startswith(key + ".") or key.startswith(bad + ".") \
                    or (bad.partition("[")[0] == key):
                return f"override {item!r}"
        # a __post_init__ check does not say which keys it read, but its message names them
        if not error.keys and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"override {item!r}"
    if path is None:
        return None
    if error.keys or not overrides:
        return str(path)
    return f"{path} with overrides {overrides}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
