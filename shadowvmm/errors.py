"""Typed exception tree for shadowvmm.

Every error raised by the project derives from :class:`ShadowVmmError`. Each
class says whether the condition is worth a reconnect (``should_reconnect``)
and may carry a root cause (``__cause__`` via ``raise ... from``).
"""

from __future__ import annotations


class ShadowVmmError(Exception):
    """Root of every shadowvmm error."""

    should_reconnect: bool = False


class ConfigError(ShadowVmmError):
    """A configuration file or value is invalid; ``key`` names the bad key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class GuestMemoryError(ShadowVmmError):
    """A guest-physical access falls outside guest memory (or a region)."""


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


class PluginError(ShadowVmmError):
    """A backend plugin could not be found or loaded."""


class MigrationError(ShadowVmmError):
    """A migration failed; the source keeps running."""


class StreamError(MigrationError):
    """A migration stream is truncated, corrupt or of an unknown version."""


class IncompatibleStateError(MigrationError):
    """Device state cannot be loaded into this implementation."""
