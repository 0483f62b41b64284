"""What a transport saves of itself, and the interface a transport offers to save and load it.

The device's own registers (features, status, queues, config) are the same on
every transport and saved by the device. A transport adds its own: virtio-pci
its PCI configuration space (with the mask of the guest-writable bytes) and its
MSI-X table; virtio-mmio nothing beyond its kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TransportImage:
    """A transport's own state: ``kind`` is ``"pci"`` or ``"mmio"`` (as in
    :attr:`~.records.TransportState.kind`); the PCI fields are None on MMIO."""

    kind: str
    pci_config_space: bytes | None = None
    #: Per config-space byte, the bits the guest may write (PCI Local Bus 3.0 §6.1).
    pci_writable: bytes | None = None
    msix_table: bytes | None = None


class StatefulTransport(Protocol):
    """A transport that saves and loads its own state (:class:`TransportImage`)."""

    def save_state(self) -> TransportImage:
        """A copy of the transport's own state."""

    def load_state(self, image: TransportImage) -> None:
        """Take *image*, saved by a transport of the same kind and sizes."""
