"""check_bases, the conformance kit's check of the ring states a stop returns, against a net
workload whose guest has not reaped every receive completion yet (its rx_used lags the used
idx: completions run as future callbacks, after the device's used idx moved)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from rings import make_split_layout

from shadowvmm.memory import GuestMemory
from shadowvmm.testing.conformance.steps import check_bases
from shadowvmm.testing.conformance.workloads import NetWorkload
from shadowvmm.virtio.split import SplitDriverQueue
from shadowvmm.virtio.vring import RingState


def rig(memory: GuestMemory, used: int, rx_used: int, made: int):
    layout = make_split_layout(64)
    ring = SplitDriverQueue(memory, layout)
    memory.store_u16(layout.used + 2, used)
    queue = SimpleNamespace(index=0, ring=ring)
    workload = NetWorkload.__new__(NetWorkload)
    workload.rx_used, workload.made_available = rx_used, Counter({NetWorkload.RX: made})
    guest = SimpleNamespace(queues=[queue], queue=lambda index: queue)
    return SimpleNamespace(guest=guest, workload=workload)


@pytest.fixture
def memory():
    mem = GuestMemory.create([(0, 1 << 20)])
    try:
        yield mem
    finally:
        mem.close()


def test_a_stop_in_flight_may_hold_receive_completions_not_reaped_yet(memory: GuestMemory) -> None:
    """Base 21 = used idx, 24 receive buffers made available, 5 completions reaped: in flight
    that is a good stop (the bound is what was made available), quiet it is not."""
    r = rig(memory, used=21, rx_used=5, made=24)
    assert check_bases(r, [RingState(0, 21)], quiet=False) == "0:21"
    with pytest.raises(AssertionError, match="base 21, the guest made 5"):
        check_bases(r, [RingState(0, 21)], quiet=True)


def test_a_base_past_every_buffer_made_available_fails(memory: GuestMemory) -> None:
    r = rig(memory, used=30, rx_used=5, made=24)
    with pytest.raises(AssertionError, match="base 30, the guest made 24"):
        check_bases(r, [RingState(0, 30)], quiet=False)


def test_a_base_past_the_used_idx_fails(memory: GuestMemory) -> None:
    r = rig(memory, used=20, rx_used=20, made=24)
    with pytest.raises(AssertionError, match="base 21 but used idx 20"):
        check_bases(r, [RingState(0, 21)], quiet=False)
