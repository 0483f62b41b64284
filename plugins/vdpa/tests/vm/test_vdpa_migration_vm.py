"""Device-state migration between two vdpa_sim_net devices, inside the VM lane.

The guest runs frames through ``vdpasim_net`` (it loops TX to RX) on device
A; the VMM stops A transparently, exports the device state (registers, ring
bases, config), imports it into a freshly realized device on B that shares
the guest memory (the local model), moves the guest over, and the traffic
continues on B from the ring positions A reached.
"""

from __future__ import annotations

import asyncio

from shadowvmm.config import DeviceConfig
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import machine_sharing, move_guest
from shadowvmm.virtio.constants import NetFeature, Status
from shadowvmm_vdpa import VdpaBackend

MAC = "02:5a:00:00:00:4c"
NET_HDR_V1 = 12
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


async def test_net_state_moves_between_simulators(vdpa_device) -> None:
    async with vdpa_device("vmiga", "vdpasim_net", mac=MAC) as path_a, \
            vdpa_device("vmigb", "vdpasim_net", mac=MAC) as path_b:
        source = Machine(memory_bytes=2 << 20)
        dest = machine_sharing(source.memory)
        cfg_a = {"path": path_a, "device": "net"}
        cfg_b = {"path": path_b, "device": "net"}
        try:
            src_dev = await source.add_device(DeviceConfig("net0", "vdpa", cfg_a, queue_size=64),
                                              VdpaBackend(cfg_a))
            guest = source.guest("net0")
            await guest.initialize(NetFeature.MAC, queue_size=64, num_queues=2)
            mac = bytes.fromhex(MAC.replace(":", ""))
            rx, tx = guest.queues
            rx_buf, tx_buf = source.allocator.alloc(2048), source.allocator.alloc(2048)

            async def loopback(tag: int) -> None:
                frame = b"\xff" * 6 + mac + b"\x88\xb5" + bytes([tag]) * 46
                received = rx.add([], [(rx_buf, 2048)])
                rx.kick()
                source.memory.write(tx_buf, bytes(NET_HDR_V1) + frame)
                assert await asyncio.wait_for(tx.request([(tx_buf, NET_HDR_V1 + len(frame))], []), 20) == 0
                assert await asyncio.wait_for(received, 20) == NET_HDR_V1 + len(frame)
                assert source.memory.read(rx_buf + NET_HDR_V1, len(frame)) == frame

            for tag in range(3):
                await loopback(tag)
            states = await src_dev.stop()
            assert [(s.index, s.base) for s in states] == [(0, 3), (1, 3)]
            state = await src_dev.export_state(source.slots["net0"].transport)
            assert state.transport.guest_status == LIVE

            dst_dev = await dest.add_device(DeviceConfig("net0", "vdpa", cfg_b, queue_size=64),
                                            VdpaBackend(cfg_b))
            dst_transport = dest.slots["net0"].transport
            dst_dev.check_import(state, dst_transport)
            await dst_dev.import_state(state, dst_transport)
            assert dst_dev.rings_running
            move_guest(guest, src_dev, dst_dev, dst_transport)
            assert guest.status() == LIVE                       # never renegotiated
            assert guest.read_config(0, 6) == mac
            for tag in range(3, 6):
                await loopback(tag)
            moved = await dst_dev.stop()
            assert [(s.index, s.base) for s in moved] == [(0, 6), (1, 6)]
            assert not src_dev.rings_running
            guest.close()
        finally:
            await dest.close()            # shares the source's memory: leaves it to the source
            await source.close()
