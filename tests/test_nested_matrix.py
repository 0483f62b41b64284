"""The scenario matrix on the host: scenario (1, 2, 2.1, 2.2, 2.2-reset, 2.3) x stop path (SUSPEND,
STOP + ring-state registers, admin-queue DEV_MODE_SET) x backend (inproc blk, the reference
back-end, qemu-storage-daemon, virtiofsd, testpmd), expectations and refusals from
:mod:`shadowvmm.testing.matrix` (the vdpa_sim column runs in the vDPA VM lane).

A passing cell: every status value the guest read, per level, exactly as listed; each request
completed once; the data (blk blocks read back, a FUSE file read back, every frame back once
and testpmd's counters both ways); the faults (scenario 1: two DIALECT_NOT_OFFERED). A refused
cell raises exactly its typed error. One peer process per backend per module (virtiofsd serves
one session per process: one per machine). ``SHADOWVMM_MATRIX_TABLE=FILE`` writes the results
as the Markdown table of README.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

import pytest

from shadowvmm.config import DeviceConfig, MachineConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.machine import Machine
from shadowvmm.scenarios import SCENARIOS, run_scenario
from shadowvmm.shadow import StopDialect
from shadowvmm.testing.matrix import SCENARIOS as SCENARIOS_ORDER
from shadowvmm.testing.matrix import (
    BackendKind,
    Cell,
    StopPath,
    cells,
    check_table,
    expected_faults,
    planned_table,
    render_table,
)
from shadowvmm.testing.peers import DpdkTestpmd, QsdBlk, RefBlk, Virtiofsd
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import NetFeature
from shadowvmm.virtio.devcfg import FS_CONFIG_BASE_SIZE, NET_CONFIG_BASE_SIZE, FsConfig, NetConfig, NetStatus

MAC = NetConfig.parse_mac("52:54:00:4d:41:54")
FS_TAG = "matrix"
IMAGE_BYTES = 16 << 20
#: The host's columns (vdpa_sim runs in the VM lane: plugins/vdpa/tests/vm/test_matrix_vm.py).
HOST = tuple(b for b in BackendKind if b is not BackendKind.VDPA_SIM)
#: What each cell showed, for SHADOWVMM_MATRIX_TABLE.
OUTCOMES: dict[Cell, str] = {}


@dataclass
class Sockets:
    """A running peer's vhost-user sockets (role 0 the source's, 1 the destination's)."""

    device: str
    sockets: tuple[Path, Path]
    config: bytes | None = None
    vmm_features: int = 0

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        cfg = replace(device, vmm_features=self.vmm_features,
                      backend_config={**device.backend_config, "socket": str(self.sockets[role])})
        return await machine.add_device(cfg, config_override=self.config)


class FreshVirtiofsd:
    """virtiofsd serves one session per process: one started per machine, all stopped at the end."""

    def __init__(self, workdir: Path, share: Path, binary: str) -> None:
        self.workdir, self.share, self.binary = workdir, share, binary
        self.device = "fs"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FreshVirtiofsd:
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        peer = self._stack.enter_context(Virtiofsd(self.workdir, source=self.share, binary=self.binary))
        cfg = replace(device, backend_config={**device.backend_config, "socket": str(peer.socket_path)})
        return await machine.add_device(cfg, config_override=FsConfig(FS_TAG).pack(FS_CONFIG_BASE_SIZE))


# ---------------------------------------------------------------------- one peer per backend per module

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@dataclass
class Source:
    """A column's backend: where the device connects, its device type, testpmd for its counters."""

    backend: BackendKind
    peers: Sockets | FreshVirtiofsd | None
    kind: str = "blk"
    testpmd: DpdkTestpmd | None = None


@pytest.fixture(scope="module")
def source(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Source]:
    """The column's peer, started once per module (pytest groups the cells by it)."""
    backend = request.param
    with contextlib.ExitStack() as stack:
        if backend is BackendKind.INPROC_BLK:
            yield Source(backend, None)
        elif backend is BackendKind.REFBLK:       # two back-ends on one image: source's, destination's
            src = stack.enter_context(RefBlk(workdir, size=IMAGE_BYTES, queues=2, name="ref-src"))
            dst = stack.enter_context(RefBlk(workdir, image=src.image, create=False, size=IMAGE_BYTES, queues=2,
                                             name="ref-dst"))
            yield Source(backend, Sockets("blk", (src.socket_path, dst.socket_path)))
        elif backend is BackendKind.QSD:          # one node, two exports
            qsd = stack.enter_context(QsdBlk(workdir, image=workdir / "qsd.img", size=IMAGE_BYTES, create=True,
                                             num_queues=2, exports=2, binary=require_peer("qemu-storage-daemon")))
            yield Source(backend, Sockets("blk", (qsd.socket_paths[0], qsd.socket_paths[1])))
        elif backend is BackendKind.VIRTIOFSD:
            share = workdir / "share"
            share.mkdir()
            yield Source(backend, FreshVirtiofsd(workdir, share, require_peer("virtiofsd")), "fs")
        else:
            pmd = stack.enter_context(DpdkTestpmd(workdir, forward_mode="io", binary=require_peer("dpdk-testpmd")))
            pmd.start_forwarding()
            config = NetConfig(mac=MAC, status=NetStatus.LINK_UP, max_virtqueue_pairs=1).pack(NET_CONFIG_BASE_SIZE)
            yield Source(backend, Sockets("net", (pmd.socket_path, pmd.socket_path), config,
                                 int(NetFeature.MAC | NetFeature.STATUS)), "net", pmd)


def device_config(cell: Cell, workdir: Path, kind: str) -> DeviceConfig:
    """The cell's device: its backend, and the stop dialect its path offers."""
    if cell.backend is BackendKind.INPROC_BLK:
        backend, options = "inproc", {"device": "blk", "image": str(workdir / "inproc.img"), "size": IMAGE_BYTES,
                                      "queues": 2}
    else:
        options = {"device": kind, "timeout": 5.0, **({"queues": 2} if kind != "fs" else {})}
        backend = "vhost-user"
    dialect = {StopPath.SUSPEND: StopDialect.SUSPEND, StopPath.STOP: StopDialect.STOP,
               StopPath.ADMIN: StopDialect.NONE}[cell.path]
    return DeviceConfig("dev0", backend, options, queue_size=64, stop_dialect=dialect, stop_feature_bit=44,
                        ring_state=cell.path is StopPath.STOP)


# ---------------------------------------------------------------------- the matrix

def _column(backend: BackendKind) -> object:
    marks = [] if backend is BackendKind.INPROC_BLK else [pytest.mark.peer]
    return pytest.param(backend, id=backend.name.lower(), marks=marks)


#: The rows: (scenario, stop path).
ROWS = sorted({(c.scenario, c.path) for c in cells()}, key=lambda r: (SCENARIOS_ORDER.index(r[0]), r[1].value))


@pytest.mark.parametrize("source", [_column(b) for b in HOST], indirect=True)
@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r[0]}-{r[1].value}") for r in ROWS])
async def test_cell(row: tuple[str, StopPath], source: Source, workdir: Path) -> None:
    cell = Cell(row[0], row[1], source.backend)
    peer = source.testpmd
    if peer is not None:
        peer.clear_stats()
    cfg = MachineConfig(memory_mib=32, devices=(device_config(cell, workdir, source.kind),))
    run = run_scenario(SCENARIOS, cell.scenario, cfg, peers=source.peers, admin=cell.path is StopPath.ADMIN,
                       strict=True)
    refusal = cell.refusal
    if refusal is not None:
        with pytest.raises(refusal.error, match=refusal.match):
            await run
        OUTCOMES[cell] = cell.planned
        return
    report = await run
    assert report.ok, report.reasons
    assert report.statuses == cell.statuses
    assert report.submitted == report.completed > 0 and report.exactly_once, report.violations
    assert report.verified > 0 and report.mismatches == 0
    assert report.faults == expected_faults(cell.scenario)
    if peer is not None:                    # every frame through testpmd, counted both ways
        stats = peer.port_stats()[0]
        assert stats["RX-packets"] == stats["TX-packets"] == report.verified
    OUTCOMES[cell] = "pass"


def test_every_cell_is_expected_or_refused() -> None:
    check_table()


def test_readme_shows_the_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "## Nested scenario matrix" in readme
    assert planned_table() in readme, "README.md: paste `python -m shadowvmm.testing.matrix`"


def test_results_table() -> None:
    """Runs last: the cells that ran showed what the table plans; optionally written out."""
    assert all(outcome == cell.planned for cell, outcome in OUTCOMES.items())
    target = os.environ.get("SHADOWVMM_MATRIX_TABLE")
    if target:
        Path(target).write_text(render_table(OUTCOMES))
