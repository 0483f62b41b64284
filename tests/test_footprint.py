"""Memory a device costs the VMM process (issue 14, goal 5: benchmarks/footprint.py)."""

from __future__ import annotations

import gc

from shadowvmm.backends.inproc_models import BlkModel


def anon_kib() -> int:
    gc.collect()
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def test_an_in_memory_blk_image_is_resident_only_where_written() -> None:
    """A 32 MiB in-memory image used to be a zero-filled bytearray: all 32 MiB resident at once."""
    before = anon_kib()
    model = BlkModel({"size": 32 << 20})
    assert model.image is not None
    grown = anon_kib() - before
    assert grown < 4 << 10, f"a fresh 32 MiB image made {grown} KiB resident"
    model.image[5 << 20:(5 << 20) + 4096] = b"\xab" * 4096
    assert model.image[5 << 20] == 0xAB and model.image[(5 << 20) - 1] == 0
    assert anon_kib() - before < 4 << 10
    model.close()
