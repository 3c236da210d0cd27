"""The one config system: dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Every stage (training, data mix, SFT, evaluation) declares its config as nested dataclasses and loads it
with :func:`load_config`. Unknown keys and values of the wrong type are errors that name the key, so a
typo in a recipe fails before any process group starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass it is loaded into."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning, from the comments in the dataclass's own source: the comment lines right above
    the field and the one at its end (the one place a key's meaning is written)."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names, out, above = {f.name for f in dataclasses.fields(cls)}, {}, []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        field = re.match(r"\s+(\w+)\s*:", line)
        if field and field.group(1) in names:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[field.group(1)] = " ".join(above + ([trailing] if trailing else []))
        above = []
    return out


def describe_keys(cls: type, prefix: str = "") -> list[str]:
    """``  key (default: value): meaning`` per leaf key of a config dataclass, for ``--help``."""
    lines, meaning = [], field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines += describe_keys(type(default), prefix + f.name + ".")
        else:
            text = meaning.get(f.name)
            lines.append(f"  {prefix + f.name} (default: {default})" + (f": {text}" if text else ""))
    return lines


def resolve_relative_paths(cfg: Any, config_file: str | Path | None, keys: list[str]) -> None:
    """Make the dotted ``keys`` that the YAML file itself sets relative to the file's folder (so recipes
    travel with what they point at); values given as overrides stay relative to the working directory."""
    if not config_file:
        return
    base = Path(config_file).resolve().parent
    written = yaml.safe_load(Path(config_file).read_text()) or {}
    for key in keys:
        *parents, leaf = key.split(".")
        node, raw = cfg, written
        for name in parents:
            node, raw = getattr(node, name), (raw.get(name) or {}) if isinstance(raw, dict) else {}
        value = getattr(node, leaf)
        if value and isinstance(raw, dict) and value == raw.get(leaf) and not Path(value).is_absolute():
            setattr(node, leaf, str((base / value).resolve()))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[leaf] = value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")
