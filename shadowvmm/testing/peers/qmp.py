"""QEMU option syntax and a synchronous QMP client (QEMU docs/interop/qmp-spec)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shadowvmm.errors import PeerCommandError

from .probe import StrPath


def qemu_opt(value: StrPath) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return os.fspath(value).replace(",", ",,")


def keyval(options: Mapping[str, Any], prefix: str = "") -> str:
    """A QAPI options dict in QEMU's dotted ``key=value,...`` syntax (nested dicts: ``addr.type=``)."""
    parts = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            parts.append(keyval(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            parts.append(f"{prefix}{key}={'on' if value else 'off'}")
        else:
            parts.append(f"{prefix}{key}={qemu_opt(str(value))}")
    return ",".join(parts)


class Qmp:
    """A synchronous QMP client on a unix socket (QEMU docs/interop/qmp-spec).

    JSON objects one per line; commands carry an ``id`` matched against the
    response, and events met meanwhile are kept in :attr:`events`.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 0

    def open(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise PeerCommandError(f"QMP {self.path}: cannot connect: {exc}") from exc
        self._sock = sock
        self._buf = bytearray()
        greeting = self._read(time.monotonic() + self.timeout)
        if "QMP" not in greeting:
            self.close()
            raise PeerCommandError(f"QMP {self.path}: no greeting, got {greeting}")
        self.execute("qmp_capabilities", {})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _read(self, deadline: float) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        while (end := self._buf.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerCommandError(f"QMP {self.path}: no answer within {self.timeout} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.close()
                raise PeerCommandError(f"QMP {self.path}: {exc}") from exc
            if not chunk:
                self.close()
                raise PeerCommandError(f"QMP {self.path}: the monitor closed the connection")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise PeerCommandError(f"QMP {self.path}: not JSON: {line!r}") from exc
        if not isinstance(message, dict):
            raise PeerCommandError(f"QMP {self.path}: not a JSON object: {line!r}")
        return message

    def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Run *command*; its ``return`` value, or :class:`PeerCommandError` for an ``error``."""
        if self._sock is None:
            raise PeerCommandError(f"QMP {self.path}: not connected")
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            self.close()
            raise PeerCommandError(f"QMP {self.path}: cannot send {command}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read(deadline)
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                break
        if "error" in message:
            error = message["error"]
            raise PeerCommandError(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        return message.get("return")

    def wait_event(self, name: str, data: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The first event *name* whose data contains *data* (kept or still to come); it is consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("event") == name and data.items() <= event.get("data", {}).items():
                    self.events.remove(event)
                    return event
            if self._sock is None:
                raise PeerCommandError(f"QMP {self.path}: not connected")
            self.events.append(self._read(deadline))
