"""Little-endian C structs as frozen dataclasses (:class:`Wire`), the base of the FUSE
wire format (:mod:`.fuse`)."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any, ClassVar, Self

from ..errors import ArgumentError


class Wire:
    """Mixin: a frozen dataclass laid out by one little-endian :class:`struct.Struct`.

    The layout is the ``layout=`` class keyword; its values map in order onto
    the dataclass fields, where a field named in ``NESTED`` is itself a
    :class:`Wire` struct embedded at that position.
    """

    LAYOUT: ClassVar[str] = ""
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    NESTED: ClassVar[Mapping[str, type[Wire]]] = MappingProxyType({})

    def __init_subclass__(cls, layout: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.LAYOUT = layout
        cls.STRUCT = struct.Struct("<" + layout)
        cls.SIZE = cls.STRUCT.size

    def flat(self) -> list[Any]:
        """The values in wire order (nested structs flattened)."""
        out: list[Any] = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Wire):
                out += value.flat()
            else:
                out.append(value)
        return out

    @classmethod
    def _build(cls, values: Iterator[Any]) -> Self:
        kwargs = {f.name: (cls.NESTED[f.name]._build(values) if f.name in cls.NESTED else next(values))
                  for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**kwargs)

    @classmethod
    def field_count(cls) -> int:
        """Values the layout carries (nested structs counted by their own fields)."""
        count = 0
        for f in fields(cls):  # type: ignore[arg-type]
            count += cls.NESTED[f.name].field_count() if f.name in cls.NESTED else 1
        return count

    def pack(self) -> bytes:
        return self.STRUCT.pack(*self.flat())

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        if len(data) - offset < cls.SIZE:
            raise ArgumentError(f"{cls.__name__} needs {cls.SIZE} bytes, got {len(data) - offset}")
        return cls._build(iter(cls.STRUCT.unpack_from(data, offset)))
