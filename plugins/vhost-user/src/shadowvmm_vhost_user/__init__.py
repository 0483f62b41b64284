"""vhost-user back-ends (QEMU ``docs/interop/vhost-user.rst``).

:mod:`.protocol` holds the wire formats as data; :mod:`.framing`,
:mod:`.endpoint` and :mod:`.peer` the socket, fd passing and the peer's
identity; :mod:`.connection` one front-end session with its reply checking
and :mod:`.channel` the back-end request channel; :mod:`.backend` the
:class:`~shadowvmm.backends.base.Backend` implementation; :mod:`.probe` the
control-plane probe; :mod:`.refbackend` a reference back-end and
:mod:`.fake` a scripted one for tests.
"""

from .backend import VhostUserBackend
from .probe import format_probe, probe

__all__ = ["VhostUserBackend", "format_probe", "probe"]
