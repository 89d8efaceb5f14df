"""Typed keyword arguments: a value checked against its declared type, and command-line text parsed into it.

Method arguments (:func:`distattr.methods.build_args`, the fields of each method's argument dataclass) and step
function arguments (:func:`distattr.steps.check_step_args`, the function's keyword parameters) are both checked
here, so the Python API and the command line refuse the same values with the same message naming what is valid.

Supported types: ``bool``, ``int``, ``float`` (finite), ``str``, ``Literal[...]`` (the choices), ``tuple[T, ...]``
and ``list[T]``, callables, and unions of these with ``None``. A parameter without a type annotation takes any
value (text from the command line is then read as JSON when it parses).
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import numbers
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NONE_WORDS = ("none", "null")
BOOL_WORDS = "true/false, yes/no, on/off, 1/0"
PYTHON_WORDS = {"True": True, "False": False, "None": None}


def parse_json_value(text: str) -> object:
    """JSON when it parses (``8``, ``true``, ``[1, 2]``, ``"x"``), Python's True/False/None, else the string: the
    reading of command-line values whose type is not declared."""
    if text in PYTHON_WORDS:
        return PYTHON_WORDS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _members(hint) -> tuple | None:
    """The members of a union (``int | None``, ``Optional[int]``), else None."""
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else None


def _untyped(hint) -> bool:
    return hint is Any or hint is inspect.Parameter.empty or hint is None


def describe(hint) -> str:
    """What a value of type ``hint`` is, in words: ``"true or false"``, ``"an integer or None"``, ``"one of 'a',
    'b'"``."""
    members = _members(hint)
    if members is not None:
        parts = [describe(m) for m in members if m is not type(None)]
        return " or ".join(parts + (["None"] if type(None) in members else []))
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(hint))
    if origin in (tuple, list):
        inner = get_args(hint)
        return f"a list of {_plural(describe(inner[0]))}" if inner else "a list"
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return "a callable"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(text: str) -> str:
    return {"a string": "strings", "an integer": "integers", "a finite number": "numbers"}.get(text, text)


def check_value(name: str, value: object, hint) -> object:
    """Return ``value`` if it is of type ``hint`` (ints are numbers, numpy scalars count; a list is accepted for a
    tuple), else raise ``ValueError("<name> must be <what>, not <value>")``. Nothing is converted: the string
    ``"no"`` is not a bool."""
    if _untyped(hint) or _matches(value, hint):
        return value
    raise ValueError(f"{name} must be {describe(hint)}, not {value!r}")


def _matches(value: object, hint) -> bool:
    members = _members(hint)
    if members is not None:
        return any(_matches(value, m) for m in members)
    if hint is type(None):
        return value is None
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in get_args(hint))
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        inner = [a for a in get_args(hint) if a is not Ellipsis]
        return not inner or all(_matches(v, inner[0]) for v in value)
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return callable(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy integers count
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a type this module does not know (a TypeVar, a Protocol): not checked


def parse_text(name: str, text: str, hint) -> object:
    """Read command-line ``text`` as a value of type ``hint`` (``"no"`` -> False for a bool, ``"8"`` -> 8 for an
    int, ``"none"`` -> None where None is allowed). Raises ``ValueError`` naming the valid values."""
    if _untyped(hint):
        return parse_json_value(text)
    word = text.strip().lower()
    members = _members(hint)
    if members is not None:
        if type(None) in members and word in NONE_WORDS:
            return None
        listed = text.strip().startswith("[")  # a JSON list goes to a list member first (str | tuple[str, ...])
        for member in sorted(members, key=lambda m: not (listed and get_origin(m) in (tuple, list))):
            if member is type(None):
                continue
            try:
                return parse_text(name, text, member)
            except ValueError:
                continue
        raise ValueError(f"{name} must be {_text_description(hint)}, not {text!r}")
    try:
        return _parse_one(text, word, hint)
    except ValueError:
        raise ValueError(f"{name} must be {_text_description(hint)}, not {text!r}") from None


def _text_description(hint) -> str:
    """:func:`describe`, with the words a bool is written as on the command line."""
    return describe(hint).replace("true or false", f"true or false ({BOOL_WORDS})")


def _parse_one(text: str, word: str, hint) -> object:
    origin = get_origin(hint)
    if origin is Literal:
        for choice in get_args(hint):
            if text == str(choice):
                return choice
        raise ValueError(text)
    if hint is bool:
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(text)
    if hint is int:
        return int(text.strip())
    if hint is float:
        value = float(text.strip())
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if hint is str:
        value = parse_json_value(text) if text.strip().startswith('"') else text
        if not isinstance(value, str):
            raise ValueError(text)
        return value
    if origin in (tuple, list):
        inner = [a for a in get_args(hint) if a is not Ellipsis]
        value = parse_json_value(text) if text.strip().startswith("[") else \
            [part.strip() for part in text.split(",") if part.strip()]  # a,b,c
        if not isinstance(value, list):
            raise ValueError(text)
        if inner:
            value = [v if _matches(v, inner[0]) else _parse_one(str(v), str(v).lower(), inner[0]) for v in value]
        return tuple(value) if origin is tuple else value
    value = parse_json_value(text)
    if not _matches(value, hint):
        raise ValueError(text)
    return value


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def parameter_hints(fn: collections.abc.Callable) -> dict[str, Any]:
    """The resolved annotations of a function's parameters; empty where they cannot be resolved."""
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):
        return {}
