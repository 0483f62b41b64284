"""A reference vhost-user back-end in Python: virtio-blk over a file or a memory image.

It exists to test the paths no packaged back-end offers (lab trace
"Not exercised": INFLIGHT_SHMFD, RESET_DEVICE, STATUS, DEVICE_STATE) end to
end through a real unix socket. It serves one front-end session at a time
on an asyncio unix server (:class:`RefBlkServer`); further clients wait in
the listen backlog. It runs in the test's process or its own
(``python -m shadowvmm_vhost_user.refbackend SOCKET``, launcher
:class:`shadowvmm.testing.peers.RefBlk`), where SIGUSR1 drops the session
(:meth:`RefBlkServer.drop_session`) and SIGTERM exits.

Implemented: the realize handshake (GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, SET_OWNER), SET_MEM_TABLE, the ring messages
(NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE, GET_VRING_BASE), GET/SET_CONFIG,
REPLY_ACK, LOG_SHMFD (SET_LOG_BASE; with LOG_ALL every guest-memory write,
buffers and used ring, is marked with atomic OR), INFLIGHT_SHMFD
(GET/SET_INFLIGHT_FD in the libvhost-user split layout, with its
resubmission on reconnect), RESET_DEVICE, STATUS and DEVICE_STATE
(SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE).

The package is split along its seams: :mod:`.inflight` (the in-flight region
layout), :mod:`.rings` (guest memory, dirty log, rings and the blk I/O model:
the shared device-side split ring code and the in-process blk model) and
:mod:`.server` (the socket, the message handlers, the device state, the
command line). Their public names are re-exported here.
"""

from __future__ import annotations

from .inflight import (
    INFLIGHT_ALIGN,
    INFLIGHT_DESC,
    INFLIGHT_HEADER,
    INFLIGHT_VERSION,
    InflightHeader,
    InflightQueue,
    InflightRegion,
    inflight_queue_bytes,
)
from .rings import BlkRings
from .server import HANDLERS, PROTOCOL_FEATURES, STATE_VERSION, RefBlkServer, main

__all__ = [
    "HANDLERS", "INFLIGHT_ALIGN", "INFLIGHT_DESC", "INFLIGHT_HEADER", "INFLIGHT_VERSION", "PROTOCOL_FEATURES",
    "STATE_VERSION", "BlkRings", "InflightHeader", "InflightQueue", "InflightRegion", "RefBlkServer",
    "inflight_queue_bytes", "main",
]
