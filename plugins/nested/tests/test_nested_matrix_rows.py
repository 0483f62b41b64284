"""The nested rows of the scenario matrix (docs/reference.md, "Nested scenario matrix") on the host:
``l1-moves-l2`` and ``l0-migrates-l1`` (2.1, 2.2, 2.3) x stop path x backend, expectations and
refusals from :data:`shadowvmm.testing.matrix.NESTED` (the core cannot import this plugin, so
its rows run here; the vdpa_sim column runs in the vDPA VM lane).

A passing cell: every status value each level read exactly as listed (L2 of its device, L1 of
its L0 devices and of the admin owner); each L2 request completed once; the data (blk blocks
read back through the L0 device L2's device ends on, i.e. from the peer's image; a FUSE file
read back; every frame back once, and the testpmd processes' counters both ways); no fault. A
refused cell raises exactly its typed error from the scenario's own code path. The peers are
the matrix's columns (:func:`shadowvmm.testing.matrix_peers.open_source`, one per module per
backend; testpmd's one port serves both L0 devices, in ``io retry`` mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm.config import MachineConfig
from shadowvmm.scenarios import all_scenarios, run_scenario
from shadowvmm.testing.matrix import NESTED, BackendKind, Cell, StopPath, expected_faults
from shadowvmm.testing.matrix_peers import Source, device_config, open_source

SCENARIOS = all_scenarios()
#: The host's columns (vdpa_sim: plugins/vdpa/tests/vm/test_matrix_vm.py).
HOST = tuple(b for b in BackendKind if b is not BackendKind.VDPA_SIM)


@pytest.fixture(scope="module")
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """The column's peer, started once per module (pytest groups the cells by it)."""
    with contextlib.ExitStack() as stack:
        yield open_source(stack, request.param, tmp_path_factory.mktemp("nested-matrix"))


def _column(backend: BackendKind) -> object:
    marks = [] if backend is BackendKind.INPROC_BLK else [pytest.mark.peer]
    return pytest.param(backend, id=backend.name.lower(), marks=marks)


def test_the_rows_are_the_plugins_scenarios() -> None:
    assert set(NESTED) <= set(SCENARIOS)


@pytest.mark.parametrize("source", [_column(b) for b in HOST], indirect=True)
@pytest.mark.parametrize("path", list(StopPath), ids=lambda p: p.value)
@pytest.mark.parametrize("scenario", NESTED)
async def test_nested_cell(scenario: str, path: StopPath, source: Source, tmp_path: Path) -> None:
    cell = Cell(scenario, path, source.backend)
    source.clear_stats()
    cfg = MachineConfig(memory_mib=32, devices=(device_config(cell, tmp_path, source.kind),))
    run = run_scenario(SCENARIOS, scenario, cfg, peers=source.peers, admin=path is StopPath.ADMIN, strict=True)
    refusal = cell.refusal
    if refusal is not None:
        with pytest.raises(refusal.error, match=refusal.match):
            await run
        return
    report = await run
    assert report.ok, report.reasons
    assert report.statuses == cell.statuses
    assert report.submitted == report.completed > 0 and report.exactly_once, report.violations
    assert report.verified > 0 and report.mismatches == 0
    assert report.faults == expected_faults(scenario)
    if source.testpmd is not None:                    # every frame through testpmd, counted both ways
        assert source.port_stats() == (report.verified, report.verified)
