"""vhost-user back-ends (QEMU ``docs/interop/vhost-user.rst``).

:mod:`.protocol` holds the wire formats as data, :mod:`.connection` the
socket, fd passing and reply checking, :mod:`.backend` the
:class:`~shadowvmm.backends.base.Backend` implementation and :mod:`.probe`
the control-plane probe.
"""

from .backend import VhostUserBackend
from .probe import format_probe, probe

__all__ = ["VhostUserBackend", "format_probe", "probe"]
