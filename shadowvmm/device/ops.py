"""The operations a device carries out on its backend, one at a time, in order (:mod:`.worker`)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class OpKind(enum.Enum):
    RECONCILE = "reconcile"
    CONFIG_WRITE = "config write"
    VECTOR = "vector change"
    QUEUE_RESET = "queue reset"
    QUEUE_START = "queue start"
    RECONNECT = "reconnect"
    DMA_SPACE = "dma space change"


@dataclass(slots=True)
class Op:
    kind: OpKind
    args: tuple = ()
    done: asyncio.Future | None = None


#: What carries out one kind of operation (its arguments are the op's ``args``).
OpHandler = Callable[..., Awaitable[None]]
