"""The vDPA VM lane: build (or reuse) the kit, boot once, run ``pytest tests/vm/`` in the guest
(from the plugin's directory, ``plugins/vdpa``, so its own pytest configuration applies).

Outside CI a host that cannot build or boot the lane skips it; under
``CI=true`` that is a failure. The timings (kit, boot, total) are printed.
``SHADOWVMM_VDPA_VM_KERNELS="6.12 6.1"`` runs the lane once per kernel
(a series or a package name; default: the newest cached or known kernel).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pytest

from shadowvmm_vdpa.vm import (
    ENV_IN_VM,
    Kit,
    VdpaVmLane,
    VmLaneError,
    VmResult,
    ci_requires_lane,
    host_python,
    kernel_compiler,
    load_order,
    modinfo,
    newc_archive,
)

#: The plugin's directory (``plugins/vdpa``): the guest's pytest runs there, on ``tests/vm``.
PLUGIN = Path(__file__).resolve().parents[1]
#: The in-VM tests, relative to :data:`PLUGIN`.
VM_TESTS = "tests/vm"
KERNELS = os.environ.get("SHADOWVMM_VDPA_VM_KERNELS", "").replace(",", " ").split() or [None]

#: pytest options of the in-guest run: no cache writes, no plugins tests/vm does not use.
GUEST_PYTEST = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-o", "console_output_style=classic")


def _unavailable(reason: str) -> None:
    if ci_requires_lane():
        pytest.fail(f"CI=true and the vDPA VM lane failed: {reason}", pytrace=False)
    pytest.skip(f"vDPA VM lane unavailable: {reason}")


def _report(config: pytest.Config, text: str) -> None:
    """Print past pytest's output capture (the timings matter on green runs too)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


def _summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="module", params=KERNELS, ids=lambda k: k or "default-kernel")
def lane_run(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Kit, float, VmResult]:
    if os.environ.get(ENV_IN_VM) == "1":
        pytest.skip("already inside the VM")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        _unavailable(f"needs Linux x86_64, this is {sys.platform} {platform.machine()}")
    lane = VdpaVmLane(kernel_package=request.param)
    started = time.monotonic()
    try:
        kit = lane.kit()
    except VmLaneError as exc:
        _unavailable(f"kit: {exc}")
    kit_seconds = time.monotonic() - started
    argv = [host_python(), "-m", "pytest", *GUEST_PYTEST]
    if request.config.pluginmanager.is_blocked("shadowvmm"):
        argv += ["-p", "no:shadowvmm"]
    argv.append(VM_TESTS)
    try:
        result = lane.run(argv, cwd=PLUGIN, results_dir=tmp_path_factory.mktemp("vdpa-vm"))
    except VmLaneError as exc:
        _unavailable(f"boot: {exc}")
    _report(request.config, f"\nvDPA VM lane ({kit.krel}): kit {kit_seconds:.1f}s "
                            f"(cold build {kit.build_seconds:.0f}s), boot {result.boot_seconds:.1f}s, "
                            f"guest pytest {result.total_seconds - result.boot_seconds:.1f}s, "
                            f"total {result.total_seconds:.1f}s; guest: {_summary(result.output)}")
    return kit, kit_seconds, result


def test_vm_tests_pass_inside_the_guest(lane_run: tuple[Kit, float, VmResult]) -> None:
    kit, _, result = lane_run
    tail = result.output[-6000:]
    assert result.returncode == 0, f"pytest {VM_TESTS} in the guest exited {result.returncode}:\n{tail}\n" \
                                   f"console:\n{result.console[-3000:]}"
    assert " passed" in result.output and " failed" not in result.output, tail
    assert result.kernel_release == kit.krel


def test_newc_archive_layout() -> None:
    data = newc_archive([("dev", 0o40755, b"", 0), ("dev/console", 0o20600, b"", 5 << 8 | 1),
                         ("init", 0o100755, b"#!/bin/sh\n", 0)])
    entries = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
        entries.append((name, fields[1], body, fields[9] << 8 | fields[10]))
    assert entries == [("dev", 0o40755, b"", 0), ("dev/console", 0o20600, b"", 0x501),
                       ("init", 0o100755, b"#!/bin/sh\n", 0)]
    assert pos == len(data) and len(data) % 4 == 0


def test_module_load_order_and_modinfo() -> None:
    order = load_order({"vhost_vdpa": ["vhost", "vdpa", "vhost_iotlb"], "vhost": ["vhost_iotlb"],
                        "vdpa": [], "vhost_iotlb": []})
    assert order.index("vhost_iotlb") < order.index("vhost") < order.index("vhost_vdpa")
    assert order.index("vdpa") < order.index("vhost_vdpa")
    ko = b"\x7fELF...\0license=GPL\0depends=vhost,vdpa\0name=vhost_vdpa\0vermagic=6.12.117+deb12-amd64 SMP\0"
    assert modinfo(ko) == {"depends": "vhost,vdpa", "name": "vhost_vdpa", "vermagic": "6.12.117+deb12-amd64 SMP"}


def test_kernel_compiler_from_debian_kernelvariables(tmp_path: Path) -> None:
    variables = tmp_path / ".kernelvariables"
    variables.write_text("override ARCH = x86\nCCACHE = ccache\n"
                         "CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12\n"
                         "override CROSS_COMPILE = x86_64-linux-gnu-\n")
    assert kernel_compiler(variables) == ("x86_64-linux-gnu-gcc-12", "gcc-12")
    assert kernel_compiler(tmp_path / "missing") == ("gcc", "gcc")


def test_host_python_is_a_real_interpreter() -> None:
    with open(os.path.realpath(host_python()), "rb") as f:
        assert f.read(4) == b"\x7fELF"
