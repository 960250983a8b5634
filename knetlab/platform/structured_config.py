"""YAML mappings and `key=value` strings applied to an OmegaConf structured config (a dataclass schema): every key is
checked against the schema (an unknown one gets a did-you-mean and the valid keys) and every value against its type,
and a failure is one `ConfigError` line naming the source (file or override), the key and what would be valid.
Experiment files (config.py) and sweep files (sweep_spec.py) are read through it."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message is one line naming the key."""


@dataclass(frozen=True)
class ErrorTexts:
    """How one kind of file words its key errors; `{key}` is the dotted key, `{expected}` the type in words. The
    source goes before them, the did-you-mean and the valid keys after an unknown key."""

    unknown_key: str = "unknown key {key}"
    unknown_section_key: str = "unknown key {key}"  # a key inside a section (e.g. model.nmae)
    wrong_type: str = "{key} must be {expected}, got {value!r}"


def read_yaml_mapping(path: Path, what: str, keys: list[str]) -> dict:
    """The mapping at the top of a YAML file, unresolved (`${...}` stays text); `what` names the file in errors
    ("config file", "sweep file") and `keys` are the valid top-level keys."""
    if not path.exists():
        raise ConfigError(f"{path}: {what} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml's and OmegaConf's parse errors share no base
        raise ConfigError(f"{path}: not valid YAML: {first_line(error)}") from None
    data = OmegaConf.to_container(loaded, resolve=False)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping ({', '.join(keys)}) at the top level, got a "
                          f"{type(data).__name__}")
    return data


def parse_override(item: str, example: str = "trainer.max_iters=100") -> tuple[str, Any]:
    """`key=value` as (dotted key, value), the value parsed by OmegaConf's grammar (`[1,2]`, `null`, `1e-4`)."""
    key, sep, _ = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. {example})")
    try:
        value: Any = OmegaConf.to_container(OmegaConf.from_dotlist([str(item)]), resolve=False)
    except Exception as error:  # the dotlist grammar raises several kinds
        raise ConfigError(f"override {item!r}: cannot parse: {first_line(error)}") from None
    try:
        for part in key.split("."):
            value = value[part]
    except (KeyError, TypeError):
        raise ConfigError(f"override {item!r}: cannot parse the key {key!r}") from None
    return key, value


def apply_mapping(cfg: DictConfig, data: Mapping[str, Any], source: str, origins: dict[str, str], schema: type,
                  texts: ErrorTexts = ErrorTexts(), prefix: str = "", root: type | None = None) -> None:
    """Set every leaf of `data` on `cfg` (whose schema is `schema`; `prefix` is the section being filled, `root`
    the whole schema), checking each key and each value's type; `origins` records which source set each key."""
    root = root or schema
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(unknown_key_message(source, str(key), schema, prefix, root, texts))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {full_key} is a section with keys ({', '.join(field_names(hint))}), "
                                  f"got {value!r}")
            apply_mapping(cfg, value, source, origins, hint, texts, prefix=f"{full_key}.", root=root)
            continue
        try:
            # Mappings (tracking.tags, a sweep's grid) merge with what a base file set; everything else replaces it.
            OmegaConf.update(cfg, full_key, value, merge=isinstance(value, Mapping))
        except OmegaConfBaseException as error:
            where, expected, shown = full_key, hint, value
            # In a mapping of entries (a sweep's grid), name the entry: grid.optim.lr, not grid.
            entry = str(getattr(error, "full_key", "") or "")[len(full_key) + 1:]
            mapping = _without_null(hint)
            if typing.get_origin(mapping) is dict and isinstance(value, Mapping) and entry in value:
                where, expected, shown = f"{full_key}.{entry}", typing.get_args(mapping)[1], value[entry]
            raise ConfigError(f"{source}: " + texts.wrong_type.format(
                key=where, expected=describe_type(expected), value=shown)) from None
        origins[full_key] = source


def unknown_key_message(source: str, key: str, schema: type, prefix: str, root: type,
                        texts: ErrorTexts = ErrorTexts()) -> str:
    full_key = f"{prefix}{key}"
    names = field_names(schema)
    where = f"in {prefix[:-1]}" if prefix else "at the top level"
    suggestion = ""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        suggestion = f"; did you mean {prefix}{close[0]}?"
    else:
        every_key = all_keys(root)
        elsewhere = [k for k in every_key if k.rsplit(".", 1)[-1] == key or k == key]
        if not elsewhere:
            elsewhere = difflib.get_close_matches(full_key, every_key, n=1, cutoff=0.75)
        if elsewhere:
            suggestion = f"; did you mean {elsewhere[0]}?"
    text = texts.unknown_section_key if prefix else texts.unknown_key
    return f"{source}: {text.format(key=full_key)}{suggestion} (valid keys {where}: {', '.join(names)})"


def all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        keys.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, f"{prefix}{name}."))
    return keys


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def describe_type(hint: Any) -> str:
    """A type hint in words: `int | None` -> "an integer or null"."""
    if _without_null(hint) is not hint:
        return f"{describe_type(_without_null(hint))} or null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "a value"}.get(
        hint, str(hint))


def _without_null(hint: Any) -> Any:
    """`X | None` -> X; any other hint as it is."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _plural(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return "lists"
    if origin is dict:
        return "mappings"
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings", Any: "values"}.get(hint, str(hint))


def nest(key: str, value: Any) -> dict:
    """"a.b.c", v -> {"a": {"b": {"c": v}}}."""
    data: Any = value
    for part in reversed(key.split(".")):
        data = {part: data}
    return data


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
