"""One way to read and check config files: model specs, profiles, server settings, training.

A config is a typed class: a :class:`ConfigModel` (pydantic), or a dataclass made with
:func:`section` where code also builds and copies it as a dataclass. Its fields use the annotated
types below. :func:`read_yaml` / :func:`read_toml` read a file, :func:`validate` turns the data into
the class. Every error is a :class:`ConfigError` (each kind of config has its subclass) that names
the file, the dotted key, the value and what is allowed::

    profiles/mine.yaml: memory.pin: 'some' is not allowed; expected one of all, transformer, none

Unknown keys are errors too, listing the allowed ones with a "did you mean".

The value types check for themselves instead of using pydantic's lax coercion, which would read
"yes" as true, 1.0 as an integer and "5" as 5; each carries the words for what it allows. The
containers (sections, lists, mappings) are pydantic's. This module is the bottom layer: it imports
the standard library, yaml and pydantic only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError, with_config
from pydantic_core import PydanticCustomError

SHOWN_CHARS = 200  # a value longer than this is cut in messages


class ConfigError(ValueError):
    """A config file or value is not allowed. Each kind of config subclasses it and may override
    the class methods below to phrase its messages (these are the profiles' words)."""

    @classmethod
    def at(cls, where: str, key: str) -> str:
        """Where a message is about: ``file: dotted.key``."""
        return f"{where}: {key or '(top level)'}"

    @classmethod
    def show(cls, key: str, value: Any) -> str:
        text = repr(value)
        return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."

    @classmethod
    def unknown(cls, where: str, key: str, name: Any, known: Sequence[str]) -> ConfigError:
        return cls(f"{cls.at(where, key)}: unknown key{did_you_mean(name, known)}; "
                   f"allowed keys here: {', '.join(known)}")

    @classmethod
    def bad(cls, where: str, key: str, value: Any, allowed: str) -> ConfigError:
        return cls(f"{cls.at(where, key)}: {cls.show(key, value)} is not allowed; expected {allowed}")

    @classmethod
    def say(cls, where: str, key: str, message: str) -> ConfigError:
        return cls(f"{cls.at(where, key)}: {message}")


def did_you_mean(name: Any, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# ----------------------------------------------------------------------------- files


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # Scalar key text is enough here ("<<" merge keys are plain scalars too).
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    dup = {k for k in keys if keys.count(k) > 1 and k != "<<"}
    if dup:
        raise _DuplicateKey(f"line {node.start_mark.line + 1}: duplicate key(s) "
                            f"{', '.join(map(str, sorted(dup, key=str)))}")
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path, error_cls: type[ConfigError] = ConfigError) -> dict:
    """The top-level mapping of a YAML file ({} when the file is empty); duplicate keys are errors."""
    text = _read_text(Path(path), error_cls)
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise error_cls(f"{path}: not valid YAML: {exc}") from None
    except _DuplicateKey as exc:
        raise error_cls(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error_cls(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_toml(path: str | Path, error_cls: type[ConfigError] = ConfigError) -> dict:
    """The table of a TOML file (TOML itself refuses duplicate keys)."""
    text = _read_text(Path(path), error_cls)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error_cls(f"{path}: not valid TOML: {exc}") from None


def _read_text(path: Path, error_cls: type[ConfigError]) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error_cls(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error_cls(f"{path}: cannot read the file ({exc})") from None


def merge(base: dict, over: dict, whole: Sequence[str] = (), path: str = "") -> dict:
    """Deep merge of raw mappings, for a file that extends another or an override: mappings merge
    key by key, other values (lists too) replace. A mapping at a dotted path in ``whole``, or in
    ``"parent.*"``, is replaced whole instead."""
    out = dict(base)
    for key, value in over.items():
        here = f"{path}.{key}" if path else str(key)
        replaced = here in whole or f"{path}.*" in whole
        mergeable = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merge(base[key], value, whole, here) if mergeable and not replaced else value
    return out


# ----------------------------------------------------------------------------- config classes

_FORBID = ConfigDict(extra="forbid")


class ConfigModel(BaseModel):
    """Base of configs read from files: unknown keys are errors and instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def section(cls: type | None = None, *, frozen: bool = True) -> Any:
    """Decorator: a dataclass that :func:`validate` reads like a :class:`ConfigModel` (unknown keys
    are errors) while code builds, copies and compares it as a plain dataclass, unchecked."""
    def make(c: type) -> type:
        return with_config(_FORBID)(dataclasses.dataclass(frozen=frozen)(c))
    return make if cls is None else make(cls)


# ----------------------------------------------------------------------------- value types


def rule(allowed: str, accept: Callable[[Any], Any], convert: Callable[[Any], Any] = lambda v: v,
         *, optional: bool = False) -> Any:
    """The annotated type of one value: ``accept(v)`` says whether it is allowed, ``convert(v)``
    gives its stored form; ``allowed`` says in words what is (``optional`` lets null through)."""
    words = allowed + (" or null" if optional else "")

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if accept(value):
            return convert(value)
        raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": words})
    return Annotated[Any, PlainValidator(check)]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or a finite float, never a bool."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _within(v: float, lo: float | None, hi: float | None, open_: bool) -> bool:
    return ((lo is None or (v > lo if open_ else v >= lo))
            and (hi is None or (v < hi if open_ else v <= hi)))


def _bounds(lo: float | None, hi: float | None, open_: bool) -> str:
    parts = [f"{op} {x}" for op, x in zip((">", "<") if open_ else (">=", "<="), (lo, hi)) if x is not None]
    return " " + " and ".join(parts) if parts else ""


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False,
            words: str | None = None) -> Any:
    """An int within [lo, hi]; a float or a bool is refused."""
    return rule(words or "an integer" + _bounds(lo, hi, False),
                lambda v: is_int(v) and _within(v, lo, hi, False), optional=optional)


def number(lo: float | None = None, hi: float | None = None, *, open: bool = False,
           optional: bool = False) -> Any:
    """A finite number within [lo, hi] (or (lo, hi) when ``open``), stored as a float."""
    return rule("a number" + _bounds(lo, hi, open),
                lambda v: is_number(v) and _within(v, lo, hi, open), float, optional=optional)


def choice(values: Sequence[str], *, optional: bool = False) -> Any:
    """One of ``values``. YAML 1.1 reads a bare on/off as a boolean: where "on" is a choice,
    true and false are read as "on" and "off"."""
    def word(v: Any) -> Any:
        return ("on" if v else "off") if isinstance(v, bool) and "on" in values else v
    return rule("one of " + ", ".join(values), lambda v: isinstance(word(v), str) and word(v) in values,
                word, optional=optional)


def items(kind: Any, min_length: int = 1) -> Any:
    """A list (stored as a tuple) of at least ``min_length`` values of type ``kind``."""
    return Annotated[tuple[kind, ...], Field(min_length=min_length)]


Bool = rule("true or false", lambda v: isinstance(v, bool))
Text = rule("a string", lambda v: isinstance(v, str))
Name = rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


# ----------------------------------------------------------------------------- validation


def fail(message: str, key: str = "") -> NoReturn:
    """For a validator checking a rule between fields: ``message`` about ``key`` (dotted, within
    the class being validated; empty for the class itself)."""
    raise PydanticCustomError("config", "{message}", {"message": message, "key": key})


def reject(value: Any, allowed: str, key: str = "") -> NoReturn:
    """Like :func:`fail`, in the words of a value that is not allowed."""
    raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": allowed, "value": value, "key": key})


def validate(cls: Any, data: Any, where: str, error_cls: type[ConfigError] = ConfigError, at: str = "") -> Any:
    """``data`` read into ``cls``, else ``error_cls`` naming ``where`` (a file, "override", ...), the
    dotted key (below ``at``, the position of ``data`` in its file), the value and what is allowed."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise explain(exc, cls, where, error_cls, at) from None


@cache
def _adapter(cls: Any) -> TypeAdapter:
    return TypeAdapter(cls)


# pydantic's own errors, for the containers: what is allowed, in words
_CONTAINER_WORDS = {"dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list",
                    "string_type": "a string", "invalid_key": "a string key",
                    "too_short": "a list of at least {min_length} item(s)",
                    "too_long": "a list of at most {max_length} item(s)"}


def explain(exc: ValidationError, cls: Any, where: str, error_cls: type[ConfigError], at: str = "") -> ConfigError:
    """The first error of ``exc`` (raised validating ``cls``) in the words of ``error_cls``."""
    err = exc.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    loc = [p for p in err["loc"] if p != "[key]"] + [p for p in ctx.get("key", "").split(".") if p]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    key = at + path if at else path.removeprefix(".")
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return error_cls.unknown(where, key, loc[-1], _keys(cls, loc[:-1]))
    if kind == "missing":
        return error_cls.say(where, key, "required key is missing")
    if kind == "config":
        return error_cls.say(where, key, ctx["message"])
    keys = () if kind == "not_allowed" else _keys(cls, loc)
    allowed = (ctx["allowed"] if kind == "not_allowed" else f"a mapping with keys {', '.join(keys)}" if keys
               else _CONTAINER_WORDS[kind].format(**ctx) if kind in _CONTAINER_WORDS else err["msg"])
    return error_cls.bad(where, key, ctx.get("value", err["input"]), allowed)


def _keys(cls: Any, loc: Sequence[Any]) -> tuple[str, ...]:
    """The keys of the section at ``loc`` inside ``cls``; () when there is none."""
    tp = cls
    for part in loc:
        tp = _unwrap(tp)
        if _is_section(tp):
            tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else (
                tp.model_fields[part].annotation if part in tp.model_fields else None)
        else:  # a list or a mapping: the type of its items
            args = typing.get_args(tp)
            tp = args[-1] if typing.get_origin(tp) is dict else args[0] if args else None
    tp = _unwrap(tp)
    if not _is_section(tp):
        return ()
    if dataclasses.is_dataclass(tp):
        return tuple(f.name for f in dataclasses.fields(tp) if f.init)
    return tuple(tp.model_fields)


def _unwrap(tp: Any) -> Any:
    """``X`` out of ``Annotated[X, ...]`` and ``X | None``."""
    if typing.get_origin(tp) is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _unwrap(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or (isinstance(tp, type) and issubclass(tp, BaseModel))
