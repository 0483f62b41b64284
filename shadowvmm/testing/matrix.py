"""The nested scenario matrix as data: scenario x stop path x backend, with what each cell must
show (every status value the guest read, per level; the faults) or why it is refused.

One source for the host matrix (``tests/test_nested_matrix.py``) and the vDPA VM lane
(``plugins/vdpa/tests/vm/test_matrix_vm.py``), and for the table in docs/reference.md
(``python -m shadowvmm.testing.matrix`` prints it; a test keeps docs/reference.md in step).

Extension point for the nested cells ("L1 moves L2's device", "L0 migrates L1"): add the
scenario name to :data:`SCENARIOS`, its per-level status lists to :data:`EXPECTED` (keys
``(scenario, path)``, levels such as ``"L0"``, ``"L1"``, ``"L2"``) and any refusal to
:data:`REFUSALS`; the tests and the table pick them up. The nested rows are :data:`NESTED`
(scenarios of the ``shadowvmm-nested`` plugin; the table's rows are :data:`ROWS`), run by
``plugins/nested/tests/test_nested_matrix_rows.py`` and, for vdpa_sim, the VM lane.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from ..errors import MigrationError, RefusedError, ScenarioError, ShadowVmmError

R, ACK_DRV, FEAT, LIVE = 0x00, 0x03, 0x0B, 0x0F
#: ACKNOWLEDGE|DRIVER|FEATURES_OK|SUSPEND: v1.4 §3.4, DRIVER_OK cleared while suspended.
SUSPENDED = 0x1B
#: DRIVER_OK|STOP (0x20): the 2021 STOP proposal, left by a reset only.
STOPPED = 0x2F


class StopPath(StrEnum):
    """How the guest's own stop (scenarios 2, 2.2) is done."""

    #: virtio 1.4 SUSPEND (status 0x10, feature 43); resumed by DRIVER_OK.
    SUSPEND = "suspend"
    #: 2021 STOP (status 0x20, feature 44) with VIRTIO_F_RING_STATE (45): the ring-state
    #: registers are read at the stop (docs/nested.md); left by a reset.
    STOP = "stop"
    #: DEV_MODE_SET (v1.4 §2.12.1.4) on member 1 through an owner's admin queue (an rng of the
    #: same machine); the member offers no stop dialect and its guest reads DRIVER_OK throughout.
    ADMIN = "admin"


class BackendKind(StrEnum):
    """The matrix's columns."""

    INPROC_BLK = "inproc blk"
    REFBLK = "reference back-end blk"
    QSD = "qemu-storage-daemon blk"
    VIRTIOFSD = "virtiofsd fs"
    TESTPMD = "testpmd net"
    #: Runs in the vDPA VM lane only (vdpasim_net, loops TX to RX).
    VDPA_SIM = "vdpa_sim net (VM lane)"


#: The rows' scenarios, in the registry's order (shadowvmm.scenarios.SCENARIOS).
SCENARIOS: tuple[str, ...] = ("1", "2", "2.1", "2.2", "2.2-reset", "2.3")
MIGRATING = frozenset({"2.1", "2.2", "2.2-reset", "2.3"})
#: The level the admin owner's driver reads under (shadowvmm.scenarios.context.OWNER).
OWNER_LEVEL = "L0 adm0"

_INIT = [R, FEAT, LIVE]
#: Every device_status value the guest read, per level, for (scenario, path) (refusals aside).
EXPECTED: dict[tuple[str, StopPath], dict[str, list[int]]] = {
    ("1", StopPath.SUSPEND): {"L0": _INIT},
    ("1", StopPath.STOP): {"L0": _INIT},
    ("1", StopPath.ADMIN): {"L0": _INIT, OWNER_LEVEL: _INIT},
    ("2", StopPath.SUSPEND): {"L0": [*_INIT, SUSPENDED, LIVE]},
    ("2", StopPath.STOP): {"L0": [*_INIT, STOPPED, *_INIT]},
    ("2", StopPath.ADMIN): {"L0": _INIT, OWNER_LEVEL: _INIT},
    ("2.1", StopPath.SUSPEND): {"L0": _INIT},
    ("2.1", StopPath.STOP): {"L0": _INIT},
    ("2.2", StopPath.SUSPEND): {"L0": [*_INIT, SUSPENDED, LIVE]},
    ("2.2-reset", StopPath.SUSPEND): {"L0": [*_INIT, SUSPENDED, *_INIT]},
    ("2.2-reset", StopPath.STOP): {"L0": [*_INIT, STOPPED, *_INIT]},
    ("2.3", StopPath.SUSPEND): {"L0": [R, LIVE, R, ACK_DRV, LIVE, *_INIT]},
    ("2.3", StopPath.STOP): {"L0": [R, LIVE, R, ACK_DRV, LIVE, *_INIT]},
    # The admin path migrates the owner with its group (shadowvmm.state.admin); the member's guest
    # reads DRIVER_OK throughout, a reset guest initialises again; 2.3 starts an owner per stage.
    ("2.1", StopPath.ADMIN): {"L0": _INIT, OWNER_LEVEL: _INIT},
    ("2.2", StopPath.ADMIN): {"L0": _INIT, OWNER_LEVEL: _INIT},
    ("2.2-reset", StopPath.ADMIN): {"L0": [*_INIT, *_INIT], OWNER_LEVEL: _INIT},
    ("2.3", StopPath.ADMIN): {"L0": [R, LIVE, R, ACK_DRV, LIVE, *_INIT], OWNER_LEVEL: _INIT * 3},
}


def expected_faults(scenario: str) -> dict[str, int]:
    """Scenario 1: the guest writes SUSPEND and STOP with no dialect offered, two counted faults."""
    return {"DIALECT_NOT_OFFERED": 2} if scenario == "1" else {}


@dataclass(frozen=True)
class Refusal:
    """A cell that cannot work: the typed error it raises, a regex its message matches, why."""

    error: type[ShadowVmmError]
    match: str
    reason: str
    scenarios: frozenset[str]
    paths: frozenset[StopPath] = frozenset(StopPath)
    backends: frozenset[BackendKind] = frozenset(BackendKind)

    def covers(self, scenario: str, path: StopPath, backend: BackendKind) -> bool:
        return scenario in self.scenarios and path in self.paths and backend in self.backends


#: Refusals, first match wins.
REFUSALS: tuple[Refusal, ...] = (
    Refusal(ScenarioError, "needs the stop dialect suspend",
            "STOP is left by a reset only (2.2-reset)", frozenset({"2.2"}), frozenset({StopPath.STOP})),
    # 2.3 migrates before DRIVER_OK: no FUSE session exists yet (INIT follows on the destination),
    # so the blocker, which applies to a started device only, does not refuse it.
    Refusal(MigrationError, "FUSE session.*does not offer DEVICE_STATE",
            "migration blocker: virtiofsd has no DEVICE_STATE for the FUSE session", MIGRATING - {"2.3"},
            backends=frozenset({BackendKind.VIRTIOFSD})),
)


# ---------------------------------------------------------------------- the nested rows
#: The nested rows: scenarios of the L1 plugin (shadowvmm_nested, entry-point group
#: ``shadowvmm.scenarios``), run by ``plugins/nested/tests/test_nested_matrix_rows.py`` (the core
#: runs none of them). ``l1-moves-l2``: L1 moves L2's device to another L0 device under L2 I/O;
#: ``l0-migrates-l1`` (2.1 one level down), ``-2.2`` (L1 had stopped its L0 device), ``-2.3``
#: (L2 had not initialised its device).
NESTED: tuple[str, ...] = ("l1-moves-l2", "l0-migrates-l1", "l0-migrates-l1-2.2", "l0-migrates-l1-2.3")
#: Levels: L2's reads of its device; L1's of its L0 device (``L1``), of the L0 device it moves
#: L2's device to (``L1 dst``) and of the admin owner (``L1 owner``).
L1_DST, L1_OWNER = "L1 dst", "L1 owner"
#: ACKNOWLEDGE|DRIVER: L1 probed its L0 device, L2 had not initialised its own (2.3).
_L1_23 = [R, ACK_DRV, FEAT, LIVE]
EXPECTED.update({
    ("l1-moves-l2", StopPath.STOP): {"L2": _INIT, "L1": [*_INIT, STOPPED, R], L1_DST: _INIT},
    #: DEV_PARTS_SET gives the destination its status (DRIVER_OK) at once: L1 reads no FEATURES_OK.
    ("l1-moves-l2", StopPath.ADMIN): {"L2": _INIT, "L1": [*_INIT, R], L1_DST: [R, LIVE], L1_OWNER: _INIT},
    ("l0-migrates-l1", StopPath.SUSPEND): {"L2": _INIT, "L1": _INIT},
    ("l0-migrates-l1", StopPath.STOP): {"L2": _INIT, "L1": _INIT},
    ("l0-migrates-l1-2.2", StopPath.SUSPEND): {"L2": _INIT, "L1": [*_INIT, SUSPENDED, LIVE]},
    ("l0-migrates-l1-2.3", StopPath.SUSPEND): {"L2": _INIT, "L1": _L1_23},
    ("l0-migrates-l1-2.3", StopPath.STOP): {"L2": _INIT, "L1": _L1_23},
    #: L0's device is member 1 of an owner (L0 adm0); the group migrates with it (the ``!admin`` record).
    ("l0-migrates-l1", StopPath.ADMIN): {"L2": _INIT, "L1": _INIT, OWNER_LEVEL: _INIT},
    ("l0-migrates-l1-2.2", StopPath.ADMIN): {"L2": _INIT, "L1": _INIT, OWNER_LEVEL: _INIT},
    ("l0-migrates-l1-2.3", StopPath.ADMIN): {"L2": _INIT, "L1": _L1_23, OWNER_LEVEL: _INIT},
})
NESTED_MIGRATING = frozenset(NESTED[1:])
#: The nested refusals (first match wins; ahead of the built-in rows', which name other scenarios).
REFUSALS = (
    Refusal(RefusedError, "FUSE session .* lives in this device's back-end",
            "the FUSE session lives in the first L0 device's virtiofsd, not in the rings",
            frozenset({"l1-moves-l2"}), backends=frozenset({BackendKind.VIRTIOFSD})),
    Refusal(RefusedError, "SUSPEND offers no way to set ring bases",
            "SUSPEND cannot start the new L0 device's rings past 0", frozenset({"l1-moves-l2"}),
            frozenset({StopPath.SUSPEND})),
    Refusal(ScenarioError, "needs the stop dialect suspend",
            "STOP is left by a reset only: L1 stops with SUSPEND", frozenset({"l0-migrates-l1-2.2"}),
            frozenset({StopPath.STOP})),
    Refusal(MigrationError, "FUSE session.*does not offer DEVICE_STATE",
            "migration blocker: virtiofsd has no DEVICE_STATE for the FUSE session",
            NESTED_MIGRATING - {"l0-migrates-l1-2.3"}, backends=frozenset({BackendKind.VIRTIOFSD})),
    *REFUSALS,
)
#: Every row of the table: the built-in scenarios, then the nested ones.
ROWS: tuple[str, ...] = (*SCENARIOS, *NESTED)


@dataclass(frozen=True)
class Cell:
    scenario: str
    path: StopPath
    backend: BackendKind

    @property
    def id(self) -> str:
        return f"{self.scenario}-{self.path.value}-{self.backend.name.lower()}"

    @property
    def refusal(self) -> Refusal | None:
        return next((r for r in REFUSALS if r.covers(self.scenario, self.path, self.backend)), None)

    @property
    def statuses(self) -> dict[str, list[int]]:
        """What the guest read per level; a cell without an entry must be refused."""
        return EXPECTED[(self.scenario, self.path)]

    @property
    def planned(self) -> str:
        refusal = self.refusal
        return "pass" if refusal is None else f"refused: {refusal.reason}"


def cells(backends: tuple[BackendKind, ...] = tuple(BackendKind), rows: tuple[str, ...] = ROWS) -> list[Cell]:
    return [Cell(s, p, b) for s in rows for p in StopPath for b in backends]


def check_table() -> None:
    """Every cell has expected statuses or a refusal (raises AssertionError naming the first hole)."""
    for cell in cells():
        assert cell.refusal is not None or (cell.scenario, cell.path) in EXPECTED, cell.id


def render_table(outcomes: Mapping[Cell, str]) -> str:
    """Rows scenario x stop path, columns backend; cells 'pass' or 'refused: reason'."""
    backends = list(BackendKind)
    lines = ["| scenario | stop path | " + " | ".join(b.value for b in backends) + " |",
             "| --- | --- | " + " | ".join("---" for _ in backends) + " |"]
    for scenario in ROWS:
        for path in StopPath:
            row = [outcomes.get(Cell(scenario, path, b), "not run") for b in backends]
            lines.append(f"| {scenario} | {path.value} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def planned_table() -> str:
    return render_table({cell: cell.planned for cell in cells()})


def summary_table() -> str:
    """The README's digest: rows scenario, columns backend; each cell names the stop paths
    that pass and those refused (the reasons are in :func:`planned_table`)."""
    backends = list(BackendKind)
    lines = ["| scenario | " + " | ".join(b.value for b in backends) + " |",
             "| --- | " + " | ".join("---" for _ in backends) + " |"]
    for scenario in ROWS:
        row = []
        for backend in backends:
            refused = [p.value for p in StopPath if Cell(scenario, p, backend).refusal is not None]
            row.append("all pass" if not refused else
                       "refused" if len(refused) == len(StopPath) else "refused: " + ", ".join(refused))
        lines.append(f"| {scenario} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    check_table()
    sys.stdout.write(summary_table() if sys.argv[1:] == ["--summary"] else planned_table())
