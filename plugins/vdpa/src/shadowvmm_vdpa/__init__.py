"""vhost-vdpa backend: ioctls and IOTLB (:mod:`.ioctl`), the backend (:mod:`.backend`),
device management over the ``vdpa`` generic-netlink family (:mod:`.netlink`)."""

from shadowvmm.errors import VdpaError, VdpaIoctlError, VdpaMappingError, VdpaNetlinkError

from .backend import VdpaBackend
from .ioctl import BackendFeature, Ioctl
from .netlink import VdpaNetlink, vhost_vdpa_path

__all__ = ["BackendFeature", "Ioctl", "VdpaBackend", "VdpaError", "VdpaIoctlError",
           "VdpaMappingError", "VdpaNetlink", "VdpaNetlinkError", "vhost_vdpa_path"]
