"""Options as data: a schema validates one config table and describes it for help.

A backend plugin declares ``OPTIONS: OptionSchema`` and validates its
``backend_config`` through it in its constructor; :mod:`shadowvmm.config`
validates the same tables at load time, with the full key path
(``device[0].backend_config.size``). Every refusal is a
:class:`~shadowvmm.errors.ConfigError` naming the key and what was expected:
unknown keys (with the known ones), missing required keys, wrong types
(``bool`` is not an ``int``), ranges, choices and per-option checks.

A schema may pick extra options by the value of one of its options
(``select`` + ``variants``): the in-process backend's ``device = "blk"``
takes ``size``, ``device = "rng"`` does not.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ArgumentError, ConfigError

#: Queues one device may have: the virtio-pci notify region (4 KiB, 4 bytes per queue,
#: :mod:`shadowvmm.transport.pci`) addresses 1024, and the in-process backend as many rings.
MAX_QUEUES = 1024


class _Required(enum.Enum):
    REQUIRED = "required"

    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of an option that must be given.
REQUIRED = _Required.REQUIRED


def _identity(value: Any) -> Any:
    return value


#: Option type -> (name shown, Python types accepted, normalisation). ``Path`` takes a
#: string or path-like and gives a string; ``float`` takes an int too; ``object`` takes anything.
TYPES: Mapping[type, tuple[str, tuple[type, ...], Callable[[Any], Any]]] = {
    bool: ("bool", (bool,), bool),
    int: ("int", (int,), int),
    float: ("number", (int, float), float),
    str: ("str", (str,), str),
    Path: ("path", (str, os.PathLike), os.fspath),
    dict: ("table", (Mapping,), dict),
    list: ("array", (list, tuple), list),
    object: ("any", (object,), _identity),
}

#: How a received value's type is named in messages (TOML's words where they differ).
_GOT: Mapping[type, str] = {dict: "table", list: "array", tuple: "array", type(None): "nothing"}


def got(value: Any) -> str:
    """The name of *value*'s type as messages show it."""
    return _GOT.get(type(value), type(value).__name__)


def join_key(path: str, key: object) -> str:
    """``path.key``, or ``key`` at the top level."""
    return f"{path}.{key}" if path else str(key)


def _bound(value: float) -> str:
    """A bound as read best: masks and sizes past 32 bits in hex."""
    if isinstance(value, int) and abs(value) >= 1 << 32:
        return f"{value:#x}"
    return str(value)


def _shown(value: Any) -> str:
    """A value as a TOML file would spell it."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class Option:
    """One key of a table: its type, default (:data:`REQUIRED` if it must be given; None if
    it may be left out), help, bounds, allowed values and a further *check* (a callable
    returning what is wrong with the value, or None)."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    min: int | float | None = None
    max: int | float | None = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ArgumentError(f"option {self.name}: type {self.type!r} is not one of {list(TYPES)}")

    @property
    def type_name(self) -> str:
        return TYPES[self.type][0]

    def constraints(self) -> str:
        """The bounds and choices in words (empty if none)."""
        if self.choices is not None:
            return "one of " + ", ".join(_shown(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            return f"{_bound(self.min)}..{_bound(self.max)}"
        if self.min is not None:
            return f">= {_bound(self.min)}"
        if self.max is not None:
            return f"<= {_bound(self.max)}"
        return ""

    def take(self, table: Mapping[str, Any], path: str) -> Any:
        """This option's value in *table* (validated), or its default."""
        key = join_key(path, self.name)
        value = table.get(self.name)
        if self.name not in table or (value is None and self.default is None):
            if self.default is REQUIRED:
                raise ConfigError(key, f"missing (required: {self.help or self.type_name})")
            return self.default
        return self.parse(value, key)

    def parse(self, value: Any, key: str) -> Any:
        """*value* validated and normalised; a ConfigError naming *key* otherwise."""
        name, accepted, normalise = TYPES[self.type]
        if (isinstance(value, bool) and self.type is not bool) or not isinstance(value, accepted):
            raise ConfigError(key, f"expected {name}, got {got(value)}")
        value = normalise(value)
        if self.type is float and not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value}")
        if self.type is Path and (not value or "\0" in value):
            raise ConfigError(key, "expected a path, got an empty string" if not value
                              else "a path cannot contain a NUL character")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(key, f"{_shown(value)} is not {self.constraints()}")
        if ((self.min is not None and value < self.min)
                or (self.max is not None and value > self.max)):
            raise ConfigError(key, f"must be {self.constraints()}, got {value}")
        if self.check is not None and (problem := self.check(value)):
            raise ConfigError(key, problem)
        return value


class OptionSchema:
    """The options of one table, in declaration order.

    ``select`` names one of them whose value picks extra options from
    ``variants`` (a schema per value); the selector's choices are the variants.
    """

    def __init__(self, *options: Option, select: str | None = None,
                 variants: Mapping[str, OptionSchema] | None = None) -> None:
        self.options: dict[str, Option] = {}
        for option in options:
            if option.name in self.options:
                raise ArgumentError(f"option {option.name!r} declared twice")
            self.options[option.name] = option
        self.select = select
        self.variants = dict(variants or {})
        if (select is None) != (not self.variants):
            raise ArgumentError("select and variants go together")
        if select is not None:
            if select not in self.options:
                raise ArgumentError(f"select {select!r} is not an option")
            self.options[select] = replace(self.options[select], choices=tuple(self.variants))

    def __contains__(self, name: object) -> bool:
        return name in self.options or any(name in v for v in self.variants.values())

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options.values())

    def validate(self, table: Any, path: str = "") -> dict[str, Any]:
        """Every option's value (given or default), validated; *path* prefixes the keys
        named in errors (``device[0].backend_config``)."""
        if not isinstance(table, Mapping):
            raise ConfigError(path or "config", f"expected a table, got {got(table)}")
        options = dict(self.options)
        chosen = None
        if self.select is not None:
            chosen = self.options[self.select].take(table, path)
            options.update(self.variants[chosen].options)
        for key in table:
            if key not in options:
                raise ConfigError(join_key(path, key), self._unknown(key, options, chosen))
        return {name: option.take(table, path) for name, option in options.items()}

    def _unknown(self, key: object, options: Mapping[str, Option], chosen: Any) -> str:
        known = ", ".join(options)
        elsewhere = [name for name, variant in self.variants.items() if key in variant.options]
        if elsewhere:
            return (f"not an option of {self.select} = {_shown(chosen)} (only of "
                    f"{', '.join(map(_shown, elsewhere))}; known: {known})")
        close = difflib.get_close_matches(str(key), list(options), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key, {hint}(known: {known})"

    def describe(self) -> list[str]:
        """One line per option, ``name  type  default  help``, columns aligned; the options
        of each variant follow under a ``select = value:`` line."""
        rows: list[tuple[str, ...]] = [self._row(o, "") for o in self]
        for value, variant in self.variants.items():
            rows.append((f"{self.select} = {_shown(value)}:" + ("" if variant.options else " no more options"),))
            rows.extend(self._row(o, "  ") for o in variant)
        widths = [max((len(r[i]) for r in rows if len(r) > 1), default=0) for i in range(3)]
        return [row[0] if len(row) == 1 else
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths + [0])).rstrip()
                for row in rows]

    @staticmethod
    def _row(option: Option, indent: str) -> tuple[str, str, str, str]:
        limits = option.constraints()
        text = f"{option.help} ({limits})" if option.help and limits else option.help or limits
        return indent + option.name, option.type_name, _shown(option.default), text


def seconds_argument(text: str) -> float:
    """An argparse ``type``: a positive, finite number of seconds (``--timeout`` of the commands)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value
