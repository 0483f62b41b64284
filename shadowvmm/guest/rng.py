"""virtio-rng guest driver model (virtio v1.4 §5.4): one requestq of writable buffers."""

from __future__ import annotations

from .driver import GuestDevice


class RngDriver:
    """Reads entropy from a virtio-rng device."""

    def __init__(self, device: GuestDevice, *, buffer_size: int = 4096) -> None:
        self.dev = device
        self.buffer_size = buffer_size
        self.buffer = 0

    async def start(self, *, packed: bool = False, queue_size: int = 64, extra_features: int = 0) -> int:
        features = await self.dev.initialize(extra_features, packed=packed, queue_size=queue_size, num_queues=1)
        self.buffer = self.dev.alloc.alloc(self.buffer_size, 16)
        return features

    async def read(self, length: int) -> bytes:
        """Up to *length* random bytes (the device may return fewer per request)."""
        out = bytearray()
        queue = self.dev.queues[0]
        while len(out) < length:
            want = min(self.buffer_size, length - len(out))
            written = await queue.request([], [(self.buffer, want)])
            out += self.dev.memory.read(self.buffer, min(written, want))
        return bytes(out)
