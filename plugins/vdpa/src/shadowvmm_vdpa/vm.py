"""The vDPA VM lane: run a command on a Debian kernel with the vDPA simulators.

The host kernel has no vDPA, so the lane boots Debian's own kernel in QEMU
(TCG, one vCPU, no network) with the host's ``/`` as the guest's root (9p,
read-only, under a tmpfs overlay whose writes are thrown away). The host's
Python, virtualenv and project tree therefore run unchanged inside the guest.

The kit (kernel, modules, initramfs) comes from :mod:`.kit`; this module boots
it. Nothing is installed except ``qemu-system-x86`` (and the kit's build tools
when missing), and only when running as root.

Results travel through a per-run results directory shared read-write (9p) at
the same path in the guest: ``cmd.sh`` (written by the host), ``started``
(guest uptime when the command starts), ``output.log`` (the command's stdout
and stderr), ``rc``. Inside the guest the command sees ``SHADOWVMM_VDPA_VM=1``,
``SHADOWVMM_VDPA_VM_KREL`` and ``SHADOWVMM_VDPA_VM_RESULTS``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shadowvmm.errors import BootError, VmLaneError

from .kit import (
    DEFAULT_CACHE_DIR,
    KIT_FORMAT,
    KIT_MODULES,
    OOT_CORE,
    OOT_SIMULATORS,
    UAPI_HEADERS,
    Kit,
    KitBuilder,
    ensure_tools,
    is_series,
    kernel_compiler,
    load_order,
    modinfo,
    newc_archive,
    newest_kernel_package,
    version_key,
)

__all__ = [
    "DEFAULT_CACHE_DIR", "ENV_IN_VM", "ENV_KERNEL_PKG", "ENV_KIT_DIR", "ENV_KREL", "ENV_RESULTS", "KIT_FORMAT",
    "KIT_MODULES", "OOT_CORE", "OOT_SIMULATORS", "PASSED_ENV", "UAPI_HEADERS", "Kit", "KitBuilder", "VdpaVmLane",
    "VmResult", "ci_requires_lane", "ensure_tools", "host_python", "in_vm", "kernel_compiler", "load_order", "main",
    "modinfo", "newc_archive", "newest_kernel_package",
]

ENV_IN_VM = "SHADOWVMM_VDPA_VM"
ENV_KREL = "SHADOWVMM_VDPA_VM_KREL"
ENV_RESULTS = "SHADOWVMM_VDPA_VM_RESULTS"
ENV_KIT_DIR = "SHADOWVMM_VDPA_KIT_DIR"
ENV_KERNEL_PKG = "SHADOWVMM_VDPA_KERNEL_PKG"

#: Host variables passed into the guest command's environment.
PASSED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TERM", "CI", "PYTHONPATH",
              "VIRTUAL_ENV", "PYENV_ROOT", "PYENV_VERSION")

_KERNEL_CMDLINE = ("console=ttyS0 panic=-1 oops=panic mitigations=off "
                   "i8042.noaux i8042.nokbd i8042.nopnp")
_V9FS = "security_model=none,multidevs=remap"


@dataclass(frozen=True)
class VmResult:
    """What one run of a command in the guest produced."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    console: str
    boot_seconds: float          #: host wall time from QEMU start to the command's start
    total_seconds: float         #: host wall time from QEMU start to QEMU exit
    guest_uptime_at_start: float | None
    boots: int
    kernel_release: str
    results_dir: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def host_python() -> str:
    """The running interpreter, never a shell shim (a pyenv shim costs ~3 s per start in TCG).

    A virtualenv's ``python`` is a symlink to the real interpreter and is kept
    as it is, so the guest sees the virtualenv's site-packages.
    """
    exe = sys.executable
    with open(os.path.realpath(exe), "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise VmLaneError(f"{exe} is not an ELF interpreter (a shim?)")
    return exe


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class VdpaVmLane:
    """Builds or reuses the kit and runs commands in a fresh guest each time."""

    cache_dir: Path | None = None
    #: a package (``linux-image-6.1.0-56-amd64``), a series (``"6.1"``) or None (newest)
    kernel_package: str | None = None
    memory: str = "1G"
    timeout: float = 600.0
    boot_tries: int = 2
    verbose: bool = False
    jobs: int = 2
    log: Callable[[str], None] = field(default=lambda msg: print(f"vdpa-vm: {msg}", file=sys.stderr))
    _kit: Kit | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        base = self.cache_dir or os.environ.get(ENV_KIT_DIR) or DEFAULT_CACHE_DIR
        self.cache_dir = Path(base).expanduser()
        self.kernel_package = self.kernel_package or os.environ.get(ENV_KERNEL_PKG) or None

    def kit(self) -> Kit:
        """The cached kit, built first when needed (under a lock, once per cache)."""
        if self._kit is not None:
            return self._kit
        assert self.cache_dir is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kit = self._cached()
            if kit is None:
                wanted = self.kernel_package
                package = wanted if wanted and not is_series(wanted) else newest_kernel_package(wanted)
                kit = KitBuilder(package, self.cache_dir / package, jobs=self.jobs, log=self.log).build()
        self._kit = kit
        return kit

    def _cached(self) -> Kit | None:
        assert self.cache_dir is not None
        wanted = self.kernel_package
        if wanted and not is_series(wanted):
            return Kit.load(self.cache_dir / wanted)
        kits = [k for k in (Kit.load(p) for p in self.cache_dir.glob("linux-image-*")) if k]
        if wanted:
            kits = [k for k in kits if k.krel.startswith(wanted + ".")]
        return max(kits, key=lambda k: version_key(k.krel), default=None)

    def run(self, argv: Sequence[str], *, cwd: str | Path | None = None,
            env: Mapping[str, str] | None = None, results_dir: str | Path | None = None,
            timeout: float | None = None, on_output: Callable[[str], None] | None = None) -> VmResult:
        """Boot a guest, run *argv* in *cwd* (default: the current directory), power off.

        *env* adds variables to the passed-through host ones. *on_output* gets
        the command's output lines while it runs. Raises :class:`BootError`
        when the guest never started the command, even after a second boot.
        """
        kit = self.kit()
        ensure_tools({"qemu-system-x86_64": "qemu-system-x86"}, self.log)
        if results_dir is None:
            results = Path(tempfile.mkdtemp(prefix="shadowvmm-vdpa-vm-"))
        else:
            results = Path(results_dir).resolve()
            results.mkdir(parents=True, exist_ok=True)
        if any(c.isspace() for c in str(results)):
            raise VmLaneError(f"results dir {results} must not contain whitespace")
        self._write_command(results, kit, argv, Path(cwd or os.getcwd()).resolve(), env or {})
        deadline = timeout or self.timeout
        started = time.monotonic()
        boots = 0
        while True:
            boots += 1
            for name in ("started", "rc", "output.log"):
                (results / name).unlink(missing_ok=True)
            boot_at, rc, console = self._boot(kit, results, deadline, on_output)
            if boot_at is not None or boots >= self.boot_tries or rc == 124:
                break
            self.log(f"guest died before the command started (boot {boots}); booting again")
        total = time.monotonic() - started
        if boot_at is None:
            raise BootError(f"guest never started the command after {boots} boot(s)"
                            f" ({'timeout' if rc == 124 else f'qemu exit {rc}'}); console:\n{console[-4000:]}")
        rc_file = results / "rc"
        returncode = int(rc_file.read_text().strip() or 125) if rc_file.exists() else (124 if rc == 124 else 125)
        uptime_text = (results / "started").read_text().strip()
        return VmResult(tuple(argv), returncode, _read(results / "output.log"), console,
                        round(boot_at - started, 2), round(total, 2),
                        float(uptime_text) if uptime_text else None, boots, kit.krel, results)

    def _write_command(self, results: Path, kit: Kit, argv: Sequence[str], cwd: Path,
                       env: Mapping[str, str]) -> None:
        variables = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        variables.update(env)
        variables.update({ENV_IN_VM: "1", ENV_KREL: kit.krel, ENV_RESULTS: str(results),
                          "PYTHONDONTWRITEBYTECODE": "1"})
        lines = ["# generated by shadowvmm_vdpa.vm"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in variables.items()]
        lines += [f"cd {shlex.quote(str(cwd))} || exit 125", "exec " + shlex.join(argv)]
        (results / "cmd.sh").write_text("\n".join(lines) + "\n")
        (results / "vm.env").write_text(
            f"VM_RESULTS={shlex.quote(str(results))}\nVM_VERBOSE={int(self.verbose)}\n")

    def _qemu_argv(self, kit: Kit, results: Path) -> list[str]:
        cmdline = _KERNEL_CMDLINE + ("" if self.verbose else " quiet loglevel=1")
        return [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35", "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "1",
            "-m", self.memory, "-kernel", str(kit.vmlinuz), "-initrd", str(kit.initrd),
            "-append", cmdline, "-serial", "stdio",
            "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{_V9FS}",
            "-virtfs", f"local,path={results},mount_tag=results,{_V9FS}",
        ]

    def _boot(self, kit: Kit, results: Path, timeout: float,
              on_output: Callable[[str], None] | None) -> tuple[float | None, int, str]:
        """One QEMU run: (host time the command started or None, qemu exit code, console)."""
        console_path = results / "console.log"
        output_path = results / "output.log"
        with open(console_path, "wb") as console:
            proc = subprocess.Popen(self._qemu_argv(kit, results), stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.monotonic()
        boot_at: float | None = None
        offset = 0
        pending = ""
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if boot_at is None and (results / "started").exists():
                    boot_at = time.monotonic()
                if on_output is not None and output_path.exists():
                    offset, pending = _stream(output_path, offset, pending, on_output)
                if time.monotonic() - start > timeout:
                    proc.kill()
                    proc.wait()
                    rc = 124
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if boot_at is None and (results / "started").exists():
            boot_at = time.monotonic()
        if on_output is not None and output_path.exists():
            offset, pending = _stream(output_path, offset, pending, on_output)
            if pending:
                on_output(pending)
        return boot_at, rc, _read(console_path)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _stream(path: Path, offset: int, pending: str, sink: Callable[[str], None]) -> tuple[int, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    text = pending + chunk.decode(errors="replace")
    *lines, rest = text.split("\n")
    for line in lines:
        sink(line)
    return offset + len(chunk), rest


def in_vm() -> bool:
    """True inside a guest started by :class:`VdpaVmLane`."""
    return os.environ.get(ENV_IN_VM) == "1"


def ci_requires_lane() -> bool:
    """Under ``CI=true`` a lane that cannot build or boot is a failure, not a skip."""
    return _ci()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shadowvmm_vdpa.vm [-k 6.1] [--build-kit] -- CMD...``: run CMD in the lane."""
    parser = argparse.ArgumentParser(prog="python -m shadowvmm_vdpa.vm", description=main.__doc__)
    parser.add_argument("-k", "--kernel", help="kernel package or series (e.g. 6.1); default: newest")
    parser.add_argument("--cache-dir", help=f"kit cache (default: ${ENV_KIT_DIR} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("-s", "--results-dir", help="results dir shared with the guest (default: a new temp dir)")
    parser.add_argument("-t", "--timeout", type=float, default=600.0)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the kernel's boot messages")
    parser.add_argument("--build-kit", action="store_true", help="only build (or find) the kit")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args(argv)
    lane = VdpaVmLane(cache_dir=Path(args.cache_dir) if args.cache_dir else None, kernel_package=args.kernel,
                      timeout=args.timeout, verbose=args.verbose)
    kit = lane.kit()
    if args.build_kit or not args.command:
        print(f"{kit.path} ({kit.package} {kit.version}, built in {kit.build_seconds:.0f}s)")
        return 0
    result = lane.run(args.command, results_dir=args.results_dir, on_output=print)
    if args.verbose:
        print(result.console, file=sys.stderr)
    print(f"vdpa-vm: {kit.krel}: exit {result.returncode}, boot {result.boot_seconds:.1f}s, "
          f"total {result.total_seconds:.1f}s, results in {result.results_dir}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
