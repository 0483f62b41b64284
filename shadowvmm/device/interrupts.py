"""Interrupts: the platform's vector eventfds, INTx and the ISR, and the call-fd relay.

With MSI-X enabled a backend signals the queue's vector eventfd directly (the
role of a KVM irqfd); otherwise it signals the device's relay eventfd for the
queue, and the device sets the ISR queue bit and raises INTx (v1.4 §4.1.4.5).
"""

from __future__ import annotations

import os

from ..virtio.constants import ISR_CONFIG, ISR_QUEUE
from .core import DeviceCore


class Interrupts:
    """The platform side of interrupts: one eventfd per MSI-X vector, plus INTx.

    A guest model waits on these fds (they play the role of KVM irqfds).
    """

    def __init__(self, vectors: int) -> None:
        self.vector_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.msix_enabled = False

    @property
    def vectors(self) -> int:
        return len(self.vector_fds)

    def close(self) -> None:
        for fd in self.vector_fds + [self.intx_fd]:
            os.close(fd)


class InterruptsMixin(DeviceCore):
    """ISR reads and acks, the call fd per queue, the INTx relay and the config interrupt."""

    def read_isr(self) -> int:
        """ISR read clears it (v1.4 §4.1.4.5)."""
        value = self.isr
        self.isr = 0
        return value

    def ack_interrupt(self, bits: int) -> None:
        """MMIO InterruptACK (v1.4 §4.2.2)."""
        self.isr &= ~bits

    def call_fd(self, index: int) -> int:
        """The fd the backend signals for queue *index* (a vector's irqfd, or our relay)."""
        q = self.queue_regs(index)
        assert q is not None
        ints = self.interrupts
        assert ints is not None
        if ints.msix_enabled and q.msix_vector < ints.vectors:
            return ints.vector_fds[q.msix_vector]
        return self._relay_fds[index]

    def _on_relay(self, index: int) -> None:
        try:
            os.eventfd_read(self._relay_fds[index])
        except BlockingIOError:
            return
        ints = self.interrupts
        if ints is None or ints.msix_enabled:
            return
        self.isr |= ISR_QUEUE
        self.stats.interrupts += 1
        os.eventfd_write(ints.intx_fd, 1)

    def _config_interrupt(self) -> None:
        ints = self.interrupts
        if ints is None:
            return
        if ints.msix_enabled:
            if self.config_msix_vector < ints.vectors:      # NO_VECTOR (0xffff) included
                os.eventfd_write(ints.vector_fds[self.config_msix_vector], 1)
            return
        self.isr |= ISR_CONFIG
        os.eventfd_write(ints.intx_fd, 1)
