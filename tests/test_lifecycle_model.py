"""The model-based lifecycle test (shadowvmm.testing.chaos) as a bounded, seeded run: random
interleavings of guest, VMM and backend events against qemu-storage-daemon (2 and 4 queues),
the reference back-end (INFLIGHT_SHMFD, as a process) and the in-process backend, with the
invariants checked all along. ``make soak`` runs the same engine for 30 minutes.

Every seed that once failed stays here as a regression test (``REGRESSIONS``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowvmm.testing.chaos import run_seed
from shadowvmm.testing.plugin import require_peer

#: (seed, backend, queues, steps): seeds that failed once, with the bug they found.
REGRESSIONS = [
    (8, "ref", 4, 40),      # a guest reset without a backend reset kept a dead session's inflight area
    (109, "qsd", 4, 50),    # a reset at status 0 while reconnecting undid the next initialisation
    (110, "ref", 4, 50),    # same
    (118, "qsd", 2, 50),    # same
    (143, "ref", 2, 50),    # same
    (490, "qsd", 2, 60),    # a queue reset did not drain: qsd completed late requests into the freed ring
    (6, "inproc", 4, 60),   # the queue-reset drain waited for requests a disabled ring never takes
]

#: A sample of seeds, chosen once and kept (reproducible), over every backend and queue count.
SAMPLE = [(seed, backend, queues, 60) for seed, (backend, queues) in zip(
    range(1000, 1008),
    [("qsd", 2), ("qsd", 4), ("ref", 2), ("ref", 4), ("inproc", 2), ("inproc", 4), ("qsd", 2), ("ref", 2)])]


def needs(backend: str) -> None:
    if backend == "qsd":
        require_peer("qemu-storage-daemon")


@pytest.mark.peer
@pytest.mark.parametrize("seed,backend,queues,steps", REGRESSIONS + SAMPLE,
                         ids=[f"{b}{q}-seed{s}" for s, b, q, _ in REGRESSIONS + SAMPLE])
async def test_random_event_orders(tmp_path: Path, seed: int, backend: str, queues: int, steps: int) -> None:
    needs(backend)
    result = await run_seed(seed, backend, queues, steps, tmp_path)
    assert result["completed"] > 100, result
