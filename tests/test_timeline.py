"""The timeline recorder: injected clock, rows, phases, downtime, JSON round trip, and no
recording (no tap at all) when a machine has no timeline."""

from __future__ import annotations

import pytest

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import TimelineFormatError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.timeline import Event, EventKind, Timeline


def ticking(step: float = 0.001):
    now = [100.0]

    def clock() -> float:
        now[0] += step
        return now[0]
    return clock


def test_records_with_the_injected_clock_rows_phases_and_downtime() -> None:
    timeline = Timeline(ticking())
    blk, mig = timeline.tap("L0", "blk0"), timeline.tap("L1", "migration")
    blk.record(EventKind.STATUS_READ, value=0x0F, reads=1)
    with mig.phase("pre-copy"):
        mig.record(EventKind.PRECOPY_ROUND, round=0, pages=12, dirty=3)
    blk.record(EventKind.STOP_START, by="vmm")
    blk.record(EventKind.GET_VRING_BASE, ring=0, base=7)
    timeline.record("L0", "admin", EventKind.ADMIN_COMMAND, opcode=13)
    mig.record(EventKind.DEST_START, devices="blk0")
    assert [round(e.t, 6) for e in timeline.events] == [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008]
    assert timeline.rows() == [("L0", "blk0"), ("L1", "migration"), ("L0", "admin")]
    [span] = timeline.spans()
    assert (span.level, span.device, span.phase) == ("L1", "migration", "pre-copy")
    assert round(span.end - span.start, 6) == 0.002
    down = timeline.downtime()
    assert down is not None and round(down[1] - down[0], 6) == 0.003
    assert timeline.of(EventKind.GET_VRING_BASE, device="blk0")[0].detail == {"ring": 0, "base": 7}


def test_json_round_trip_and_refusals() -> None:
    timeline = Timeline(ticking())
    timeline.tap("L0", "blk0").record(EventKind.SWITCH_OVER, downtime_ms=1.5)
    with timeline.phase("L0", "migration", "setup"):
        pass
    back = Timeline.from_json(timeline.to_json())
    assert back.events == timeline.events
    assert back.events[0] == Event(timeline.events[0].t, "L0", "blk0", EventKind.SWITCH_OVER, {"downtime_ms": 1.5})
    for bad in ("[]", "{", '{"format": "shadowvmm-timeline", "version": 99, "events": []}',
                '{"format": "shadowvmm-timeline", "version": 1, "events": [{"t": 0, "kind": "NOPE"}]}'):
        with pytest.raises(TimelineFormatError):
            Timeline.from_json(bad)
    assert Timeline(ticking()).downtime() is None


async def test_a_machine_without_timeline_gives_no_tap_to_devices_or_guests() -> None:
    machine = Machine(16 << 20)
    try:
        device = await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20}))
        guest = machine.guest("blk0")
        await BlkDriver(guest).start(queue_size=16)
        assert device.timeline is None and guest.transport.status_log.timeline is None
        assert machine.tap("blk0") is None
    finally:
        await machine.close()


@pytest.mark.parametrize("transport", ["pci", "mmio"])
async def test_a_machine_with_a_timeline_records_status_stop_and_ring_bases(transport: str) -> None:
    timeline = Timeline()
    machine = Machine(16 << 20, timeline=timeline, level="L1")
    try:
        device = await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20,
                                                                          "queues": 2}, transport=transport))
        driver = BlkDriver(machine.guest("blk0"))
        await driver.start(queue_size=16)
        await driver.write(0, b"a" * 512)
        await device.stop()
        await device.resume()
        kinds = [e.kind for e in timeline.events]
        assert {e.level for e in timeline.events} == {"L1"}
        writes = [e.detail["value"] for e in timeline.of(EventKind.STATUS_WRITE)]
        assert writes == [0, 0x01, 0x03, 0x0B, 0x0F]
        assert [e.detail["value"] for e in timeline.of(EventKind.STATUS_READ)] == [0, 0x0B, 0x0F]
        assert [e.detail["ring"] for e in timeline.of(EventKind.GET_VRING_BASE)] == [0, 1]
        order = [k for k in kinds if k in (EventKind.STOP_START, EventKind.DRAIN_START, EventKind.DRAIN_END,
                                           EventKind.GET_VRING_BASE, EventKind.STOP_END, EventKind.RESUME)]
        assert order == [EventKind.STOP_START, EventKind.DRAIN_START, EventKind.DRAIN_END, EventKind.GET_VRING_BASE,
                         EventKind.GET_VRING_BASE, EventKind.STOP_END, EventKind.RESUME]
    finally:
        await machine.close()


@pytest.mark.leaks_fds     # matplotlib keeps its font files open for the process's life
def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from shadowvmm.plot import plot_timeline
    timeline = Timeline(ticking())
    tap = timeline.tap("L0", "blk0")
    with tap.phase("stop"):
        tap.record(EventKind.STOP_START)
    tap.record(EventKind.RESUME)
    out = plot_timeline(timeline, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
