"""The backend side of a chaos run (:mod:`.chaos`): peers on one image and a backend per device.

Two exports (or processes, or models) of one image, so a local migration has
somewhere to go; each host can crash, stop or hang up its backend on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..backends.base import Backend, load_backend
from ..backends.inproc import InProcBackend
from .peers import QsdBlk, RefBlk

IMAGE_BYTES = 8 << 20


class Host:
    """The backend side of a run: its peers, and a backend object per device built on them.

    Two exports (or processes, or models) of one image, so a local migration has
    somewhere to go; ``active`` is the one the device uses now.
    """

    can_kill = False
    can_close = False

    def __init__(self, workdir: Path, queues: int) -> None:
        self.workdir = workdir
        self.queues = queues
        self.image = workdir / "disk.img"
        self.active = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def backend(self, index: int) -> Backend:
        raise NotImplementedError

    def kill(self, sig: int) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close_session(self) -> None:
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""

    def read_image(self) -> bytes:
        return self.image.read_bytes()


class QsdHost(Host):
    can_kill = True
    can_close = True

    def __init__(self, workdir: Path, queues: int) -> None:
        super().__init__(workdir, queues)
        self.peer = QsdBlk(workdir, image=self.image, size=IMAGE_BYTES, create=True, num_queues=queues,
                           exports=2, qmp=True)

    def start(self) -> None:
        self.peer.start()

    def stop(self) -> None:
        self.peer.stop()

    def backend(self, index: int) -> Backend:
        return load_backend("vhost-user")({"socket": str(self.peer.socket_paths[index]), "device": "blk",
                                 "queues": self.queues, "timeout": 3.0})

    def kill(self, sig: int) -> None:
        self.peer.kill(sig)

    def restart(self) -> None:
        self.peer.restart()

    def close_session(self) -> None:
        self.peer.close_export(self.active)
        self.peer.add_export(self.active)

    def log_tail(self) -> str:
        return self.peer.log_tail()


class RefHost(Host):
    """Two reference back-end processes on one image (INFLIGHT_SHMFD, with request latency)."""

    can_kill = True
    can_close = True

    def __init__(self, workdir: Path, queues: int) -> None:
        super().__init__(workdir, queues)
        self.peers = [RefBlk(workdir, image=self.image, size=IMAGE_BYTES, create=i == 0, queues=queues,
                             latency_us=2000, latency_data_only=True, name=f"refblk{i}") for i in range(2)]

    def start(self) -> None:
        for peer in self.peers:
            peer.start()

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()

    def backend(self, index: int) -> Backend:
        return load_backend("vhost-user")({"socket": str(self.peers[index].socket_path), "device": "blk",
                                 "queues": self.queues, "timeout": 3.0})

    def kill(self, sig: int) -> None:
        self.peers[self.active].kill(sig)

    def restart(self) -> None:
        self.peers[self.active].restart()

    def close_session(self) -> None:
        self.peers[self.active].drop_session()

    def log_tail(self) -> str:
        return "\n".join(peer.log_tail() for peer in self.peers)


class InprocHost(Host):
    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_BYTES)

    def backend(self, index: int) -> Backend:
        return InProcBackend({"device": "blk", "image": str(self.image), "size": IMAGE_BYTES,
                              "queues": self.queues, "latency_us": 1500})


HOSTS: dict[str, Callable[[Path, int], Host]] = {"qsd": QsdHost, "ref": RefHost, "inproc": InprocHost}
