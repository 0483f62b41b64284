"""Typed exception tree for shadowvmm: every error the package raises is defined here.

Every error derives from :class:`ShadowVmmError`. Each class says whether the
condition is worth a reconnect (``should_reconnect``) and may carry a root
cause (``__cause__`` via ``raise ... from``). Messages name what was wrong:
the key path of a config value, the vhost-user request and socket, the device
and queue, the value and its limit.

::

    ShadowVmmError
    ├── ConfigError                 a config file or value (``key``: the full key path)
    ├── ArgumentError (ValueError)  a caller passed a value the API refuses
    │   ├── ArgumentTypeError (TypeError)
    │   ├── TimelineFormatError     a timeline document that cannot be read
    │   ├── ScenarioError           an unknown scenario, or one the device cannot run
    │   └── ProbeRefused            probing would use up a one-shot back-end's only session
    ├── GuestMemoryError            a guest-physical access outside guest memory
    ├── AdminStatusError            an administration command refused (its status and qualifier)
    │   └── AdminFormatError        a malformed command or part (status EINVAL)
    ├── GuestAccessError            a guest register access refused (counted)
    ├── RingError                   a malformed virtqueue in guest memory
    ├── DeviceStateError            an operation in a state that does not allow it
    │   ├── DeviceFailedError       the device failed (NEEDS_RESET) while waited on
    │   ├── DeviceNotReadyError     a test device was not ready (started) within its bound
    │   └── DmaSpaceError           a DMA space (IOMMU mapping) change while the device runs
    ├── BackendError                a backend failed or answered wrongly
    │   ├── BackendTimeout, BackendDisconnected   (should_reconnect)
    │   ├── ProtocolError           a reply breaks the wire protocol
    │   ├── UnsupportedError        a capability the operation needs is missing
    │   │   └── RefusedError        the lower device offers no way to do it (a nested move)
    │   ├── RequestFailed           vhost-user: a request answered with a non-zero status
    │   └── VdpaError               vhost-vdpa: VdpaIoctlError, VdpaNetlinkError, VdpaMappingError
    ├── PluginError                 a backend plugin cannot be found or loaded
    ├── MissingExtraError           an optional dependency is not installed (``extra``: what to install)
    ├── MigrationError              a migration failed; the source keeps running
    │   ├── StreamError             a truncated, corrupt or unknown stream
    │   │   └── StateFormatError    a malformed device state
    │   ├── IncompatibleStateError  a state this destination cannot load
    │   │   └── UnknownRequiredFieldError
    │   ├── StopTimeoutError        a device did not stop within the bound
    │   └── DestinationRefused      the destination refused, or did not confirm, what it loaded
    ├── GuestDriverError            a guest driver model's request failed:
    │   BlkIOError, FuseError, NetCtrlError, NeedsResetShown, AdminCommandFailed
    └── PeerError                   a test peer launcher: PeerMissing, PeerStartError,
        PeerCommandError; VmLaneError: KitBuildError, ToolMissingError, BootError

Test harnesses report a broken invariant as an ``AssertionError`` (pytest's failure).
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class ShadowVmmError(Exception):
    """Root of every shadowvmm error."""

    should_reconnect: bool = False


class ConfigError(ShadowVmmError):
    """A configuration file or value is invalid: ``key`` is the full key path, ``message``
    what was expected, ``source`` the file (when the value came from one)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {key}: {message}" if source else f"{key}: {message}")
        self.key = key
        self.message = message
        self.source = source

    def located(self, source: str | None) -> ConfigError:
        """The same error, said of the file *source*."""
        return ConfigError(self.key, self.message, source)


class ArgumentError(ShadowVmmError, ValueError):
    """A caller passed a value the API refuses (a programming error, not an input the
    VMM serves: guest and backend inputs are counted or fail the device instead)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """A caller passed a value of the wrong type."""


class TimelineFormatError(ArgumentError):
    """A timeline document (:meth:`shadowvmm.timeline.Timeline.from_json`) that cannot be read."""


class ProbeRefused(ArgumentError):
    """A probe not done: it would use up the only session of a one-shot back-end (virtiofsd
    exits after its session); the caller may insist (``shadowvmm probe --force``)."""


class ScenarioError(ArgumentError):
    """An unknown scenario, or one the chosen device cannot run (its type, its stop dialect)."""


class GuestMemoryError(ShadowVmmError):
    """A guest-physical access falls outside guest memory (or a region)."""


class AdminStatusError(ShadowVmmError):
    """An owner device refuses an administration command: ``status`` and ``qualifier`` are
    what it answers with (v1.4 §2.12.1)."""

    def __init__(self, message: str, status: int, qualifier: int) -> None:
        super().__init__(message)
        self.status = int(status)
        self.qualifier = int(qualifier)


class AdminFormatError(AdminStatusError):
    """An administration command, result or device part is malformed (v1.4 §2.12.1): status
    EINVAL (22) with ``qualifier``."""

    def __init__(self, message: str, qualifier: int) -> None:
        super().__init__(message, _errno.EINVAL, qualifier)


class GuestAccessError(ShadowVmmError):
    """A guest register access the transport refused (counted, never fatal)."""


class RingError(ShadowVmmError):
    """A virtqueue in guest memory is malformed (bad descriptor, loop, index)."""


class DeviceStateError(ShadowVmmError):
    """A public operation was called in a state that does not allow it."""


class DeviceFailedError(DeviceStateError):
    """A device failed (DEVICE_NEEDS_RESET shown) while something waited on it; the cause
    is the backend's error."""

    def __init__(self, device: str, reason: BaseException | None) -> None:
        super().__init__(f"{device}: device failed (DEVICE_NEEDS_RESET): {reason}")
        self.device = device


class DeviceNotReadyError(DeviceStateError):
    """A device built for a test (:mod:`shadowvmm.testing.ready`) did not get ready: machine
    built, device realized, the guest driver at DRIVER_OK and the backend started, within
    its bound; the cause is the underlying error or the timeout."""


class DmaSpaceError(DeviceStateError):
    """A device's DMA address space (its IOMMU mapping) was changed while its rings run: it
    changes only before DRIVER_OK, after a reset, or while the device is stopped."""


class BackendError(ShadowVmmError):
    """A backend failed or answered wrongly."""


class BackendTimeout(BackendError):
    """A backend did not answer within the deadline."""

    should_reconnect = True


class BackendDisconnected(BackendError):
    """The backend's connection closed."""

    should_reconnect = True


class ProtocolError(BackendError):
    """A backend reply violates the wire protocol (code, flags, size, fds)."""


class UnsupportedError(BackendError):
    """The backend lacks a capability the operation needs."""


class RefusedError(UnsupportedError):
    """What the operation needs has no way to be done on the device below (a nested hypervisor
    moving a device whose stop path cannot set ring bases on a fresh device)."""


class RequestFailed(BackendError):
    """The vhost-user back-end answered a request with a non-zero status (REPLY_ACK or a
    status reply); ``request`` is the request code."""

    def __init__(self, request: object, status: int, detail: str = "") -> None:
        name = getattr(request, "name", str(request))
        super().__init__(f"{name} failed: back-end status {status:#x}{detail}")
        self.request = request
        self.status = status


class VdpaError(BackendError):
    """A vhost-vdpa operation failed."""


class VdpaIoctlError(VdpaError):
    """An ioctl or IOTLB write on ``/dev/vhost-vdpa-N`` failed; ``errno`` is the kernel's."""

    def __init__(self, operation: str, err: int, detail: str = "") -> None:
        self.operation = operation
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{operation}: {name} ({os.strerror(err)}){': ' + detail if detail else ''}")


class VdpaNetlinkError(VdpaError):
    """The kernel refused a vdpa netlink request; ``errno`` is the kernel's."""

    def __init__(self, command: str, err: int, message: str = "") -> None:
        self.command = command
        self.errno = err
        self.message = message
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"vdpa {command}: {name} ({message or os.strerror(err)})")


class VdpaMappingError(VdpaError):
    """Guest memory cannot be mapped into the device (not shared, outside the IOVA range)."""


class PluginError(ShadowVmmError):
    """A backend plugin could not be found or loaded."""


class MissingExtraError(ShadowVmmError):
    """A feature needs an optional dependency that is not installed; ``extra`` is the
    package extra that brings it (``pip install 'shadowvmm[plot]'``)."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        super().__init__(f"{feature} needs {module}, which is not installed: "
                         f"pip install 'shadowvmm[{extra}]'")
        self.extra = extra


class MigrationError(ShadowVmmError):
    """A migration failed; the source keeps running."""


class StreamError(MigrationError):
    """A migration stream is truncated, corrupt or of an unknown version."""


class IncompatibleStateError(MigrationError):
    """Device state cannot be loaded into this implementation."""


class StateFormatError(StreamError):
    """A serialized device state is malformed (wrong type, missing field, inconsistent value)."""


class UnknownRequiredFieldError(IncompatibleStateError):
    """A state carries a required field this reader does not know."""


class StopTimeoutError(MigrationError):
    """A device did not stop within the bound; the migration was abandoned."""

    def __init__(self, slow: dict[str, float], bound: float) -> None:
        names = ", ".join(f"{name} ({seconds * 1e3:.1f} ms)" for name, seconds in slow.items())
        super().__init__(f"device(s) did not stop within {bound * 1e3:.0f} ms: {names}; "
                         "migration abandoned, every source device resumed")
        self.slow = slow
        self.bound = bound


class DestinationRefused(MigrationError):
    """The destination refused the stream or the state, or did not confirm what it loaded;
    the source resumed."""


class GuestDriverError(ShadowVmmError):
    """A guest driver model's request failed (the device answered it with an error)."""


class BlkIOError(GuestDriverError):
    """The device completed a virtio-blk request with a non-OK status (v1.4 §5.2.6)."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: virtio-blk status {status}")
        self.status = status


class FuseError(GuestDriverError):
    """A FUSE request failed: the device answered with ``-errno`` in ``fuse_out_header.error``."""

    def __init__(self, err: int, opcode: object | None = None, what: str = "") -> None:
        self.errno = err
        self.opcode = opcode
        name = _errno.errorcode.get(err, f"errno {err}")
        op_name = getattr(opcode, "name", None)
        op = op_name if op_name is not None else (f"opcode {opcode}" if opcode else "request")
        where = f" {what}" if what else ""
        super().__init__(f"FUSE {op}{where}: {name} ({os.strerror(err)})")


class NetCtrlError(GuestDriverError):
    """The device answered a virtio-net control command with VIRTIO_NET_ERR (or garbage)."""

    def __init__(self, cls: int, cmd: int, ack: int) -> None:
        # The class is named when the caller passes it as an enum (virtio.devcfg.CtrlClass):
        # this module imports nothing from the project.
        name = cls.name if isinstance(cls, enum.Enum) else str(cls)
        super().__init__(f"virtio-net control command {name}/{cmd}: ack {ack}")
        self.ack = ack


class AdminCommandFailed(GuestDriverError):
    """The owner device completed an administration command with a non-OK status (v1.4 §2.12.1)."""

    def __init__(self, opcode: object, status: int, qualifier: int) -> None:
        name = opcode.name if isinstance(opcode, enum.Enum) else f"opcode {opcode}"
        super().__init__(f"admin command {name}: status {status}, qualifier {qualifier}")
        self.opcode = opcode
        self.status = status
        self.qualifier = qualifier


class NeedsResetShown(GuestDriverError):
    """The device showed DEVICE_NEEDS_RESET while the guest waited for a request: the request
    will not complete until the guest resets the device."""


class PeerError(ShadowVmmError):
    """Base of the errors raised by the test peer launchers (shadowvmm.testing)."""


class PeerMissing(PeerError):
    """The peer's executable is not installed."""

    def __init__(self, name: str, tried: list[str] | tuple[str, ...]) -> None:
        super().__init__(f"{name} not found (tried {', '.join(tried)}); run scripts/install-peers.sh as root")
        self.name = name


class PeerStartError(PeerError):
    """The peer exited or did not become ready in time; carries its log tail."""

    def __init__(self, name: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{name}: {reason}\n--- log tail ---\n{log_tail}")
        self.name = name
        self.reason = reason
        self.log_tail = log_tail


class PeerCommandError(PeerError):
    """A command to a running peer failed or timed out."""


class VmLaneError(PeerError):
    """The vDPA VM lane could not provide a result."""


class KitBuildError(VmLaneError):
    """The kit (kernel, modules, initramfs) could not be built."""


class ToolMissingError(KitBuildError):
    """A host tool the lane needs is missing and could not be installed."""


class BootError(VmLaneError):
    """The guest died or timed out before the command started."""
