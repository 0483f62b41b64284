"""shadowvmm.backends.peer: the listener of a unix socket, found from /proc without connecting."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from shadowvmm.backends.peer import socket_listener


def test_finds_this_process_listening(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert socket_listener(path) is None            # bound, not listening
        sock.listen()
        found = socket_listener(path)
        assert found is not None and found.pid == os.getpid()
        assert found.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        argv0 = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert found.name == os.path.basename(argv0)
        assert found.name.startswith("python") or found.name == os.path.basename(sys.executable)
    assert socket_listener(path) is None                # closed


def test_no_proc_is_not_an_error(tmp_path: Path) -> None:
    assert socket_listener(tmp_path / "s.sock", proc=tmp_path / "no-proc") is None
