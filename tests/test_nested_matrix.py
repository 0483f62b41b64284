"""The scenario matrix on the host: scenario (1, 2, 2.1, 2.2, 2.2-reset, 2.3) x stop path (SUSPEND,
STOP + ring-state registers, admin-queue DEV_MODE_SET) x backend (inproc blk, the reference
back-end, qemu-storage-daemon, virtiofsd, testpmd), expectations and refusals from
:mod:`shadowvmm.testing.matrix` (the vdpa_sim column runs in the vDPA VM lane, the nested rows in
plugins/nested/tests/test_nested_matrix_rows.py; the peers: :mod:`shadowvmm.testing.matrix_peers`).

A passing cell: every status value the guest read, per level, exactly as listed; each request
completed once; the data (blk blocks read back, a FUSE file read back, every frame back once
and testpmd's counters both ways); the faults (scenario 1: two DIALECT_NOT_OFFERED). A refused
cell raises exactly its typed error. One peer process per backend per module (virtiofsd serves
one session per process: one per machine). ``SHADOWVMM_MATRIX_TABLE=FILE`` writes the results
as the Markdown table of docs/reference.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm.config import MachineConfig
from shadowvmm.scenarios import SCENARIOS, run_scenario
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
    summary_table,
)
from shadowvmm.testing.matrix_peers import Source, device_config, open_source

#: The host's columns (vdpa_sim runs in the VM lane: plugins/vdpa/tests/vm/test_matrix_vm.py).
HOST = tuple(b for b in BackendKind if b is not BackendKind.VDPA_SIM)
#: What each cell showed, for SHADOWVMM_MATRIX_TABLE.
OUTCOMES: dict[Cell, str] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def source(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Source]:
    """The column's peer, started once per module (pytest groups the cells by it)."""
    with contextlib.ExitStack() as stack:
        yield open_source(stack, request.param, workdir)


# ---------------------------------------------------------------------- the matrix

def _column(backend: BackendKind) -> object:
    marks = [] if backend is BackendKind.INPROC_BLK else [pytest.mark.peer]
    return pytest.param(backend, id=backend.name.lower(), marks=marks)


#: The rows: (scenario, stop path), the built-in scenarios (the nested rows run in plugins/nested/tests).
ROWS = sorted({(c.scenario, c.path) for c in cells(rows=SCENARIOS_ORDER)},
              key=lambda r: (SCENARIOS_ORDER.index(r[0]), r[1].value))


@pytest.mark.parametrize("source", [_column(b) for b in HOST], indirect=True)
@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r[0]}-{r[1].value}") for r in ROWS])
async def test_cell(row: tuple[str, StopPath], source: Source, workdir: Path) -> None:
    cell = Cell(row[0], row[1], source.backend)
    source.clear_stats()
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
    if source.testpmd is not None:                     # every frame through testpmd, counted both ways
        assert source.port_stats() == (report.verified, report.verified)
    OUTCOMES[cell] = "pass"


def test_every_cell_is_expected_or_refused() -> None:
    check_table()


def test_readme_shows_the_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    assert "## Nested scenario matrix" in readme
    assert planned_table() in readme, "docs/reference.md: paste `python -m shadowvmm.testing.matrix`"
    front = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert summary_table() in front, "README.md: paste `python -m shadowvmm.testing.matrix --summary`"


def test_results_table() -> None:
    """Runs last: the cells that ran showed what the table plans; optionally written out."""
    assert all(outcome == cell.planned for cell, outcome in OUTCOMES.items())
    target = os.environ.get("SHADOWVMM_MATRIX_TABLE")
    if target:
        Path(target).write_text(render_table(OUTCOMES))
