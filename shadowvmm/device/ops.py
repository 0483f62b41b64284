"""The operations a device carries out on its backend, one at a time, in order (:mod:`.worker`)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class OpKind(enum.Enum):
    """What an :class:`Op` does; members hash by identity (they key the handler table, and
    :class:`enum.Enum`'s own ``__hash__`` is a Python call per lookup)."""

    __hash__ = object.__hash__

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


#: A reconcile without reasons (:meth:`~.worker.WorkerMixin._submit_wait` never queues the op it
#: is given, so one instance serves every caller).
RECONCILE = Op(OpKind.RECONCILE)

#: What carries out one kind of operation (its arguments are the op's ``args``).
OpHandler = Callable[..., Awaitable[None]]
