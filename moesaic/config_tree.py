"""A typed tree of dataclasses from plain mappings: type checks, dotted overrides, YAML.

Generic machinery behind `config.py` (and the study configs): `from_dict` builds a dataclass
from a (partial) mapping, checking every value against its annotation and converting only
where lossless (int → float); unknown keys and wrong types raise `ConfigError` with one line
and a "did you mean" hint. Dotted overrides (`train.lr=1e-3`) are parsed as YAML values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from moesaic.errors import ConfigError, did_you_mean


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and convert where lossless (int → float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}={value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} must be a mapping")
        kt, vt = typing.get_args(tp)
        return {_coerce(path, k, kt): _coerce(f"{path}.{k}", v, vt) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {_type_name(tp)} at {path}")


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    where = f"{path}.{key}" if path else key
    extra = did_you_mean(key, valid, prefix=f"{path}." if path else "", listing=False)
    return ConfigError(f"unknown config key '{where}'{extra}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a (partial) mapping; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(path, str(key), names)
        kwargs[key] = _coerce(f"{path}.{key}" if path else key, value, hints[key])
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping, or a one-line ConfigError naming `what` it is."""
    try:
        data = yaml.safe_load(Path(path).read_bytes()) or {}  # bytes: YAML detects the encoding
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}' nests lists or mappings too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a raw mapping (checked when the config is built)."""
    data = deep_merge({}, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            nxt = node.get(key)
            if not isinstance(nxt, dict):
                nxt = {}
                node[key] = nxt
            node = nxt
        node[keys[-1]] = value
    return data
