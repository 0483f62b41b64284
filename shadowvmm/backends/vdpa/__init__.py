"""vhost-vdpa backend: ioctls and IOTLB (:mod:`.ioctl`), the backend (:mod:`.backend`),
device management over the ``vdpa`` generic-netlink family (:mod:`.netlink`)."""

from .backend import VdpaBackend, VdpaMappingError
from .ioctl import BackendFeature, Ioctl, VdpaError, VdpaIoctlError
from .netlink import VdpaNetlink, VdpaNetlinkError, vhost_vdpa_path

__all__ = ["BackendFeature", "Ioctl", "VdpaBackend", "VdpaError", "VdpaIoctlError",
           "VdpaMappingError", "VdpaNetlink", "VdpaNetlinkError", "vhost_vdpa_path"]
