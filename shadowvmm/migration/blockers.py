"""Why a device cannot migrate now, checked before anything stops.

A blocker names the device and the reason; :func:`refuse_if_blocked` refuses
the whole migration with every reason found. The backend's part comes from
the contract (:mod:`shadowvmm.backends.base`): its capabilities
(``DIRTY_LOG``, ``SHARED_MEMORY``, ``DEVICE_STATE``), the process serving it
(:meth:`~shadowvmm.backends.base.Backend.peer_identity`) and its own
:meth:`~shadowvmm.backends.base.Backend.migration_blockers`.

An admin-queue owner is no blocker: its group (members, LIST_USE, resource objects, the
admin ring's position) and each member's stopped mode travel in the device states
(:mod:`shadowvmm.state.admin`), and the owner's VMM stop lets a command under way complete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from ..backends.base import Backend, Capability
from ..device import VirtioDevice
from ..errors import MigrationError
from ..virtio.constants import DeviceId


def peer_pid(backend: Backend) -> int | None:
    """The pid of the process serving *backend* (:meth:`Backend.peer_identity`), if it names one."""
    identity = backend.peer_identity()
    return None if identity is None else identity.pid


def open_file_handles(pid: int) -> list[str]:
    """Files and directories process *pid* holds open for I/O (O_PATH inode handles excluded)."""
    handles = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        if int(name) <= 2:
            continue
        try:
            target = os.readlink(f"{base}/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if not target.startswith("/") or target.startswith(("/proc/", "/dev/", "/memfd:")):
            continue
        if flags & os.O_PATH:
            continue
        handles.append(target)
    return sorted(handles)


def _memory_blocker(name: str, device: VirtioDevice) -> str | None:
    """Copy model: guest-memory writes the VMM does not see must be logged by the backend."""
    caps = device.backend_caps
    if caps & (Capability.SHARED_MEMORY | Capability.DIRTY_LOG):
        return None
    return (f"{name}: backend {device.backend.implementation!r} cannot log the guest memory it writes "
            "(no LOG_ALL/LOG_SHMFD), so copy migration would lose its writes")


async def _fs_session_blockers(name: str, device: VirtioDevice, fs_session: str) -> list[str]:
    """A started virtio-fs device whose backend cannot hand its FUSE session over (no
    DEVICE_STATE) migrates only with ``remount``, and only while its backend holds no open file."""
    b = device.backend
    if fs_session != "remount":
        return [f"{name}: the guest's FUSE session (INIT, the inode table, open files) lives only "
                f"in the virtio-fs backend {b.implementation!r}, which does not offer DEVICE_STATE "
                "(vhost-user protocol feature 19) to hand it over: the destination would answer EIO "
                "until the guest mounts again; to migrate anyway and have the guest remount, use "
                "fs_session='remount' (shadowvmm migrate --fs-remount)"]
    pid = await asyncio.to_thread(peer_pid, b) if device.backend_caps & Capability.PEER_IDENTITY else None
    if pid is None:
        return [f"{name}: cannot verify that the virtio-fs backend holds no open files, and it "
                "does not offer DEVICE_STATE (vhost-user protocol feature 19)"]
    out = []
    try:
        handles = open_file_handles(pid)
    except OSError as exc:
        handles = []
        out.append(f"{name}: cannot inspect the virtio-fs backend (pid {pid}): {exc}")
    if handles:
        listed = ", ".join(handles[:4]) + (", ..." if len(handles) > 4 else "")
        out.append(f"{name}: the virtio-fs backend (pid {pid}) holds {len(handles)} open file "
                   f"handle(s) ({listed}); open handles are backend state, and this backend does "
                   "not offer DEVICE_STATE (vhost-user protocol feature 19) to migrate them; "
                   "close the files in the guest and retry")
    return out


async def blockers(name: str, device: VirtioDevice, mode: str, fs_session: str = "refuse") -> list[str]:
    """Why *device* cannot migrate now (empty: it can); checked before anything stops."""
    out = []
    if mode == "copy" and (reason := _memory_blocker(name, device)) is not None:
        out.append(reason)
    caps = device.backend_caps
    if device.device_id == DeviceId.FS and not caps & Capability.DEVICE_STATE and device.started:
        out += await _fs_session_blockers(name, device, fs_session)
    out += [f"{name}: {reason}" for reason in device.backend.migration_blockers()]
    return out


async def refuse_if_blocked(devices: Mapping[str, VirtioDevice], mode: str, fs_session: str) -> None:
    """Raise :class:`MigrationError` with every blocker of every device, if there is one."""
    found = await asyncio.gather(*(blockers(name, device, mode, fs_session) for name, device in devices.items()))
    reasons = [reason for group in found for reason in group]
    if reasons:
        raise MigrationError("migration refused before anything stopped: " + "; ".join(reasons))
