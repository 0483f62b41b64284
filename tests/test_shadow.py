"""Status shadow, feature policy and the guest-visible stop dialects."""

from __future__ import annotations

import asyncio

import pytest

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import ConfigError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.shadow import DialectSpec, FeaturePolicy, GuestFault, StopDialect
from shadowvmm.virtio.constants import Feature, Status

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


async def setup(dialect: StopDialect = StopDialect.NONE, bit: int = 44, accept_stop: bool = True):
    machine = Machine(32 << 20)
    cfg = DeviceConfig("blk0", "inproc", {"device": "blk", "latency_us": 1000},
                       stop_dialect=dialect, stop_feature_bit=bit)
    device = await machine.add_device(cfg)
    guest = machine.guest("blk0")
    driver = BlkDriver(guest)
    extra = device.policy.dialect.feature if accept_stop else 0
    await driver.start(extra_features=extra)
    await device.settle()
    return machine, device, guest, driver


def test_policy_offer_and_forward() -> None:
    policy = FeaturePolicy(DialectSpec.make(StopDialect.SUSPEND))
    backend = int(Feature.VERSION_1 | Feature.EVENT_IDX | Feature.NOTIFY_ON_EMPTY | Feature.LOG_ALL
                  | Feature.UNUSED_30) | 0b110
    offered = policy.offer(backend)
    assert offered & Feature.SUSPEND and offered & Feature.RING_RESET
    assert not offered & (Feature.NOTIFY_ON_EMPTY | Feature.LOG_ALL | Feature.UNUSED_30)
    assert offered & 0b110 == 0b110
    forwarded = policy.to_backend(offered)
    assert not forwarded & (Feature.SUSPEND | Feature.RING_RESET)


def test_stop_feature_bit_must_not_collide() -> None:
    for bit in (40, 41, 43, 50):
        with pytest.raises(ConfigError) as err:
            DialectSpec.make(StopDialect.STOP, bit)
        assert err.value.key == "device.stop_feature_bit"
    assert DialectSpec.make(StopDialect.STOP, 46).feature == 1 << 46


@pytest.mark.parametrize("bit", [Status.SUSPEND, Status.STOP])
async def test_stop_bits_not_offered_are_ignored_and_counted(bit: Status) -> None:
    machine, device, guest, driver = await setup()
    assert not device.device_features & Feature.SUSPEND
    guest.transport.set_status(LIVE | bit)
    await device.settle()
    assert guest.status() == LIVE
    assert device.faults.counts[GuestFault.DIALECT_NOT_OFFERED] == 1
    assert device.rings_running
    await driver.write(0, b"q" * 512)
    assert await driver.read(0, 512) == b"q" * 512
    guest.close()
    await machine.close()


async def test_suspend_offered_but_not_negotiated_is_ignored() -> None:
    machine, device, guest, driver = await setup(StopDialect.SUSPEND, accept_stop=False)
    assert device.device_features & Feature.SUSPEND
    guest.transport.set_status(LIVE | Status.SUSPEND)
    await device.settle()
    assert guest.status() == LIVE
    assert device.rings_running
    guest.close()
    await machine.close()


async def test_suspend_dialect_v14() -> None:
    """virtio 1.4 §3.4: SUSPEND set -> device presents SUSPEND=1, DRIVER_OK=0; DRIVER_OK resumes."""
    machine, device, guest, driver = await setup(StopDialect.SUSPEND)
    backend = device.backend
    assert not backend.features & Feature.SUSPEND, "the VMM-owned bit reached the backend"
    guest.transport.set_status(LIVE | Status.SUSPEND)
    await device.settle()
    assert guest.status() == (LIVE | Status.SUSPEND) & ~Status.DRIVER_OK
    assert not device.rings_running
    assert device.ring_states, "suspended rings expose their state"
    pending = asyncio.create_task(driver.write(8, b"s" * 512))
    await asyncio.sleep(0.01)                       # held suspended a while: nothing completes
    assert not pending.done()
    guest.transport.set_status(LIVE)
    await device.settle()
    assert guest.status() == LIVE
    await asyncio.wait_for(pending, 2)
    assert await driver.read(8, 512) == b"s" * 512
    guest.close()
    await machine.close()


async def test_stop_dialect_2021_with_configurable_bit() -> None:
    machine, device, guest, driver = await setup(StopDialect.STOP, bit=45)
    assert device.device_features & (1 << 45)
    assert not device.backend.features & (1 << 45)
    guest.transport.set_status(LIVE | Status.STOP)
    await device.settle()
    assert guest.status() == LIVE | Status.STOP        # DRIVER_OK stays, STOP shows
    assert not device.rings_running
    guest.transport.set_status(LIVE)                   # STOP is cleared only by reset
    await device.settle()
    assert guest.status() == LIVE | Status.STOP
    assert device.faults.counts[GuestFault.STATUS_CLEAR] == 1
    await guest.reset()
    assert guest.status() == 0
    await driver.start(extra_features=1 << 45)
    await driver.write(0, b"r" * 512)
    assert await driver.read(0, 512) == b"r" * 512
    guest.close()
    await machine.close()


async def test_vmm_stop_and_guest_suspend_compose() -> None:
    machine, device, guest, driver = await setup(StopDialect.SUSPEND)
    await device.stop()
    assert guest.status() == LIVE                       # transparent: nothing shows
    guest.transport.set_status(LIVE | Status.SUSPEND)
    await device.settle()
    assert guest.status() & Status.SUSPEND              # rings already stopped: done at once
    await device.resume()                               # the VMM resumes, the guest still holds it
    assert not device.rings_running
    guest.transport.set_status(LIVE)
    await device.settle()
    assert device.rings_running and guest.status() == LIVE
    await driver.flush()
    guest.close()
    await machine.close()


async def test_status_rules() -> None:
    machine, device, guest, driver = await setup()
    t = guest.transport
    t.set_status(Status.ACKNOWLEDGE)                    # clears bits without reset: ignored
    assert guest.status() == LIVE
    assert device.faults.counts[GuestFault.STATUS_CLEAR] == 1
    t.set_status(LIVE | Status.NEEDS_RESET)             # device-owned bit: ignored
    assert guest.status() == LIVE
    assert device.faults.counts[GuestFault.DEVICE_OWNED_BIT] == 1
    await guest.reset()
    t.set_status(Status.ACKNOWLEDGE | Status.FEATURES_OK)   # FEATURES_OK before DRIVER
    assert guest.status() == Status.ACKNOWLEDGE
    assert device.faults.counts[GuestFault.STATUS_ORDER] == 1
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    t.set_driver_features(int(Feature.VERSION_1) | 1 << 63)   # not offered
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert not guest.status() & Status.FEATURES_OK
    assert device.faults.counts[GuestFault.FEATURES_REFUSED] == 1
    t.set_driver_features(0)                                  # VERSION_1 missing: refused too
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert not guest.status() & Status.FEATURES_OK
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FAILED)
    assert guest.status() & Status.FAILED
    guest.close()
    await machine.close()
