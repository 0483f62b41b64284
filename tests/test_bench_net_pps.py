"""benchmarks/net_pps.py runs end to end on a tiny frame count and prints the JSON it promises
(keys and invariants only: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shadowvmm.testing.plugin import require_peer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "net_pps.py"


def load_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("net_pps_bench", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.peer
def test_net_pps_tiny_run_emits_json() -> None:
    require_peer("dpdk-testpmd")
    bench = load_bench()
    result = json.loads(json.dumps(bench.main(["--frames", "3000", "--secs", "0.2", "--warmup", "0.1",
                                               "--layouts", "split", "--profile", "--loop", "asyncio"])))
    assert {"benchmark", "frame_bytes", "path", "bypassed", "reference", "results", "goal", "machine"} <= set(result)
    assert result["benchmark"] == "net_pps" and result["frame_bytes"] == 64
    split = result["results"]["split"]
    assert split["negotiated"]["packed"] == {"shadowvmm": False, "dpdk": False}
    assert split["sample_echo_verified"] == 256
    for direction in ("tx", "rx"):
        ours, dpdk = split[direction]["shadowvmm"], split[direction]["dpdk_virtio_user"]
        assert ours["counters_match"] is True and ours["frames"] > 0 and ours["mpps"] > 0
        assert dpdk["packets"] > 0 and dpdk["mpps"] > 0
        assert split[direction]["ratio"] == pytest.approx(ours["mpps"] / dpdk["mpps"], rel=1e-2)
        assert split[direction]["ratio_per_frontend_cpu_second"] > 0
        assert ours["profile"]["top"] and {"function", "own_us_per_request"} <= set(ours["profile"]["top"][0])
    tx = split["tx"]["shadowvmm"]
    assert tx["frames"] <= 3000 and tx["testpmd_rx_packets"] == tx["frames"] + tx["profile"]["frames"]
    assert split["rx"]["shadowvmm"]["payload_sample_verified"] > 0
    goal = result["goal"]
    assert goal["tx_ratio_at_least"] == 0.25 and set(goal["tx_ratios"]) == {"split"}
    assert goal["met"] == (goal["tx_ratios"]["split"] >= 0.25)
