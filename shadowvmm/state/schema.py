"""The versioned section schema every migration state record is written in.

Versioning. The envelope carries :data:`FORMAT_VERSION`. Every field is
declared in a schema (:class:`FieldSpec`) with the format version that
introduced it. On the wire a required field's key is prefixed with ``!``;
a reader ignores unknown optional keys, refuses unknown required keys
(:class:`UnknownRequiredFieldError`), and fills fields newer than the
state's format with their defaults, so newer readers accept older states.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Self

from ..errors import StateFormatError, UnknownRequiredFieldError

#: Current state format. Bump when a field is added (a reader refuses formats newer than its
#: own); mark it required only if a reader must refuse a state that carries it unknown.
#: Format 2 added the admin group part (:mod:`.admin`).
FORMAT_VERSION = 2
#: Oldest format this reader accepts.
MIN_FORMAT_VERSION = 1
#: Wire-key prefix of a field the reader must understand.
REQUIRED = "!"


@dataclass(frozen=True)
class FieldSpec:
    """One field of a state section: its type, whether it is required, since when it exists.

    ``kind`` is a scalar type or a :class:`Section` subclass; ``many``: a list
    of them; ``optional``: ``None`` is allowed.
    """

    name: str
    kind: Any
    required: bool = True
    since: int = 1
    default: Any = None
    many: bool = False
    optional: bool = False

    @cached_property
    def key(self) -> str:
        return (REQUIRED if self.required else "") + self.name

    @cached_property
    def section(self) -> bool:
        """The field holds a nested :class:`Section` (computed once: states are encoded in the downtime)."""
        return isinstance(self.kind, type) and issubclass(self.kind, Section)

    @cached_property
    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def encode(self, value: Any, version: int = FORMAT_VERSION) -> Any:
        if value is None:
            return None
        if self.many:
            return [self._encode_one(v, version) for v in value]
        return self._encode_one(value, version)

    def _encode_one(self, value: Any, version: int) -> Any:
        if self.section:
            return value.to_wire(version)
        if self.kind is bytes:
            return bytes(value)
        return value

    def decode(self, value: Any, version: int, where: str) -> Any:
        if value is None:
            if self.optional:
                return None
            raise StateFormatError(f"{where}.{self.name}: must not be null")
        if self.many:
            if not isinstance(value, list):
                raise StateFormatError(f"{where}.{self.name}: expected a list, got {type(value).__name__}")
            return tuple(self._decode_one(v, version, f"{where}.{self.name}[{i}]")
                         for i, v in enumerate(value))
        return self._decode_one(value, version, f"{where}.{self.name}")

    def _decode_one(self, value: Any, version: int, where: str) -> Any:
        if self.section:
            return self.kind.from_wire(value, version, where)
        kinds = self.kinds
        if isinstance(value, bool) and bool not in kinds:
            raise StateFormatError(f"{where}: expected {kinds[0].__name__}, got bool")
        if not isinstance(value, kinds):
            raise StateFormatError(f"{where}: expected {kinds[0].__name__}, got {type(value).__name__}")
        return value


class Section:
    """A frozen dataclass whose fields are declared in ``SCHEMA``."""

    SCHEMA: ClassVar[tuple[FieldSpec, ...]]
    #: ``SCHEMA`` by field name, built once per class that declares a schema.
    FIELDS: ClassVar[dict[str, FieldSpec]] = {}
    #: Each field under both wire spellings (``!name`` and ``name``), so decoding looks a key up once.
    WIRE_KEYS: ClassVar[dict[str, FieldSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "SCHEMA" in cls.__dict__:
            cls.FIELDS = {spec.name: spec for spec in cls.SCHEMA}
            cls.WIRE_KEYS = {**cls.FIELDS, **{REQUIRED + spec.name: spec for spec in cls.SCHEMA}}

    def validate(self) -> None:
        """Semantic checks; raise :class:`StateFormatError`."""

    def to_wire(self, version: int = FORMAT_VERSION) -> dict[str, Any]:
        """The wire map of format *version*: fields added after it are left out."""
        self.validate()
        return {spec.key: spec.encode(getattr(self, spec.name), version)
                for spec in self.SCHEMA if spec.since <= version}

    @classmethod
    def _unlisted(cls, key: Any, version: int, where: str) -> FieldSpec | None:
        """A key not spelled as in :attr:`WIRE_KEYS`: refused if malformed or an unknown required
        field, else ``None`` (an unknown optional field, ignored)."""
        if not isinstance(key, str) or not key.lstrip(REQUIRED):
            raise StateFormatError(f"{where}: bad key {key!r}")
        required = key.startswith(REQUIRED)
        name = key[len(REQUIRED):] if required else key
        spec = cls.FIELDS.get(name)
        if spec is None and required:
            raise UnknownRequiredFieldError(
                f"{where}: required field {name!r} (state format {version}) is unknown to this "
                f"reader (format {FORMAT_VERSION})")
        return spec

    @classmethod
    def from_wire(cls, data: Any, version: int, where: str) -> Self:
        if not isinstance(data, dict):
            raise StateFormatError(f"{where}: expected a map, got {type(data).__name__}")
        wire = cls.WIRE_KEYS
        values: dict[str, Any] = {}
        for key, value in data.items():
            spec = wire.get(key) if isinstance(key, str) else None
            if spec is None:
                spec = cls._unlisted(key, version, where)
                if spec is None:
                    continue
            values[spec.name] = spec.decode(value, version, where)
        for spec in cls.SCHEMA:
            if spec.name in values:
                continue
            if spec.required and spec.since <= version:
                raise StateFormatError(f"{where}: required field {spec.name!r} is missing")
            values[spec.name] = spec.default
        obj = cls(**values)
        obj.validate()
        return obj


def shown(text: str, limit: int = 64) -> str:
    """*text* (a name a peer sent) cut to *limit* characters for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def check_range(where: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise StateFormatError(f"{where}: {value} is outside [{low}, {high}]")
