"""The kit of the vDPA VM lane (:mod:`.vm`): Debian's kernel, the vDPA modules and a busybox initramfs.

The kit is built once and cached (default ``~/.cache/shadowvmm/vdpa-kit``,
``$SHADOWVMM_VDPA_KIT_DIR`` or the ``cache_dir`` argument overrides it). It
holds Debian's kernel image, the in-tree modules the lane needs (vdpa,
vhost_vdpa, vhost, vhost_iotlb, 9p, overlay and their dependencies), the
modules Debian does not ship (vringh, vdpa_sim, vdpa_sim_net, vdpa_sim_blk;
on a kernel without ``CONFIG_VDPA`` such as Debian's 6.1 also vdpa and
vhost_vdpa) compiled out-of-tree from Debian's ``linux-source-X.Y`` against the
matching ``linux-headers``, a busybox initramfs, and the kernel's uapi
``vhost.h``/``vhost_types.h``/``vdpa.h`` for reference. Every input is a Debian
package fetched with ``apt-get download`` at the image's exact version and
unpacked with ``dpkg-deb -x``; nothing is installed except build tools when
missing, and only when running as root.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowvmm.errors import KitBuildError, ToolMissingError

DEFAULT_CACHE_DIR = Path("~/.cache/shadowvmm/vdpa-kit")
KIT_FORMAT = 1

#: Modules the kit carries (their ``depends=`` closure comes along), in-tree or
#: built here; ``False`` marks a module that may be built into the kernel.
KIT_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", False), ("9pnet_virtio", True), ("9p", True), ("overlay", True),
    ("vdpa", True), ("vhost_vdpa", True), ("vdpa_sim_net", True), ("vdpa_sim_blk", True),
)

#: Out-of-tree modules Debian never ships (CONFIG_VDPA_SIM, CONFIG_VHOST_RING off):
#: module name -> source files in the kernel tree.
OOT_SIMULATORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vringh", ("drivers/vhost/vringh.c",)),
    ("vdpa_sim", ("drivers/vdpa/vdpa_sim/vdpa_sim.c", "drivers/vdpa/vdpa_sim/vdpa_sim.h")),
    ("vdpa_sim_net", ("drivers/vdpa/vdpa_sim/vdpa_sim_net.c",)),
    ("vdpa_sim_blk", ("drivers/vdpa/vdpa_sim/vdpa_sim_blk.c",)),
)

#: Out-of-tree vDPA core, for kernels built without CONFIG_VDPA (Debian 6.1).
OOT_CORE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vdpa", ("drivers/vdpa/vdpa.c",)),
    ("vhost_vdpa", ("drivers/vhost/vdpa.c", "drivers/vhost/vhost.h")),
)

#: uapi headers copied into the kit (second source for the ioctl/netlink tables).
UAPI_HEADERS = ("include/uapi/linux/vhost.h", "include/uapi/linux/vhost_types.h",
                "include/uapi/linux/vdpa.h")

#: 9p mount options of the guest's shares (host root, results).
NINE_P = "trans=virtio,version=9p2000.L,msize=512000"

# /init of the initramfs (busybox sh). @MODULES@ is the load order, deps first.
_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "shadowvmm-vm: $*" > /dev/console; }
for m in @MODULES@; do insmod /lib/modules/$m.ko || say "insmod $m failed"; done
R=/mnt/results N=/newroot
mkdir -p $R /mnt/host /mnt/rw $N
mount -t 9p -o @9P@,cache=none results $R || { say "cannot mount the results share"; poweroff -f; }
. $R/vm.env
fail() { say "$*"; echo 125 > $R/rc; sync; poweroff -f; }
mount -t 9p -o @9P@,ro,cache=loose hostroot /mnt/host || fail "cannot mount the host root"
mount -t tmpfs -o mode=755 tmpfs /mnt/rw && mkdir /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay $N \
    || fail "cannot mount the root overlay"
mount -t proc proc $N/proc; mount -t sysfs sysfs $N/sys; mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm; mount -t devpts devpts $N/dev/pts; mount -t tmpfs tmpfs $N/dev/shm
mount -t tmpfs -o mode=755 tmpfs $N/run
mkdir -p "$N$VM_RESULTS" && mount --move $R "$N$VM_RESULTS" || fail "cannot move the results share"
R="$N$VM_RESULTS"
ip link set lo up
[ "$VM_VERBOSE" = 1 ] || echo 1 > /proc/sys/kernel/printk
cut -d' ' -f1 /proc/uptime > "$R/started"
chroot $N /bin/sh "$VM_RESULTS/cmd.sh" < /dev/null > "$R/output.log" 2>&1
echo $? > "$R/rc"
sync; umount "$R"
poweroff -f
"""


@dataclass(frozen=True)
class Kit:
    """A built kit: kernel, initramfs and what they were made from."""

    path: Path
    package: str
    version: str
    krel: str
    modules: tuple[str, ...]
    built_out_of_tree: tuple[str, ...]
    build_seconds: float

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.cpio"

    @property
    def uapi_dir(self) -> Path:
        """``include/linux`` headers of the kit's kernel source."""
        return self.path / "include" / "linux"

    @classmethod
    def load(cls, path: Path) -> Kit | None:
        """The kit in *path*, or ``None`` when it is missing or incomplete."""
        try:
            meta = json.loads((path / "kit.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != KIT_FORMAT:
            return None
        kit = cls(path, meta["package"], meta["version"], meta["krel"], tuple(meta["modules"]),
                  tuple(meta["built_out_of_tree"]), float(meta["build_seconds"]))
        return kit if kit.vmlinuz.is_file() and kit.initrd.is_file() else None


def newc_archive(entries: Iterable[tuple[str, int, bytes, int]]) -> bytes:
    """A ``newc`` cpio archive (the initramfs format) of ``(name, mode, data, rdev)``.

    Directories must precede their contents. ``rdev`` is ``major << 8 | minor``
    for device nodes, else 0.
    """
    out = bytearray()

    def put(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    ino = 0
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        put(ino, name, mode, data, rdev)
    put(ino + 1, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def modinfo(ko: bytes) -> dict[str, str]:
    """``key=value`` strings of a module's ``.modinfo`` section (first occurrence wins)."""
    info: dict[str, str] = {}
    for key in ("depends", "vermagic", "name"):
        match = re.search(rb"\0" + key.encode() + rb"=([^\0]*)\0", ko)
        if match:
            info[key] = match.group(1).decode(errors="replace")
    return info


def load_order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules ordered so that every module follows its dependencies."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KitBuildError(f"module dependency cycle through {name}")
        state[name] = 1
        for dep in deps.get(name, ()):
            visit(dep)
        state[name] = 2
        order.append(name)

    for name in sorted(deps):
        visit(name)
    return order


def run_tool(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ToolMissingError(f"{what}: {argv[0]} not found") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise KitBuildError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def ensure_tools(tools: Mapping[str, str], log: Callable[[str], None] = lambda _: None) -> None:
    """Make every command of *tools* (command -> Debian package) available.

    Missing ones are installed with apt-get when running as root; otherwise
    :class:`ToolMissingError` names the packages to install.
    """
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolMissingError(f"missing packages (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, stdin=subprocess.DEVNULL)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ToolMissingError(f"apt-get install {' '.join(missing)} failed: {proc.stderr[-2000:]}")


def version_key(text: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


class KitBuilder:
    """Builds a kit for one Debian kernel package (see the module docstring)."""

    def __init__(self, package: str, dest: Path, *, jobs: int = 2,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.package = package
        self.dest = dest
        self.jobs = max(1, min(jobs, os.cpu_count() or 1))
        self.log = log

    def build(self) -> Kit:
        started = time.monotonic()
        ensure_tools({"apt-get": "apt", "dpkg-deb": "dpkg", "tar": "tar", "xz": "xz-utils",
                      "make": "make", "ld": "binutils"}, self.log)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{self.package}-", dir=self.dest.parent))
        try:
            kit_dir = work / "kit"
            kit_dir.mkdir()
            meta = self._build_into(work, kit_dir)
            meta["build_seconds"] = round(time.monotonic() - started, 1)
            (kit_dir / "kit.json").write_text(json.dumps(meta, indent=1) + "\n")
            if self.dest.exists():
                shutil.rmtree(self.dest)
            kit_dir.rename(self.dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        kit = Kit.load(self.dest)
        if kit is None:
            raise KitBuildError(f"kit in {self.dest} is incomplete after the build")
        self.log(f"kit ready in {kit.build_seconds:.0f}s: {self.dest}")
        return kit

    def _build_into(self, work: Path, kit_dir: Path) -> dict[str, Any]:
        pkg = self.package
        krel = pkg.removeprefix("linux-image-")
        policy = run_tool(["apt-cache", "policy", pkg], what="apt-cache policy")
        match = re.search(r"Candidate:\s*(\S+)", policy)
        if not match or match.group(1) == "(none)":
            raise KitBuildError(f"apt knows no candidate for {pkg} (apt-get update?)")
        version = match.group(1)
        show = run_tool(["apt-cache", "show", f"linux-headers-{krel}={version}"], what="apt-cache show")
        depends = re.search(r"^Depends: (.*)$", show, re.M)
        siblings = sorted({d.strip().split()[0] for d in (depends.group(1) if depends else "").split(",")
                           if re.match(r"\s*(linux-headers-\S+-common|linux-kbuild-\S+)", d)})
        source = "linux-source-" + ".".join(krel.split(".")[:2])
        wanted = [pkg, f"linux-headers-{krel}", *siblings, source]
        debs = work / "debs"
        debs.mkdir()
        self.log(f"downloading {pkg} {version} and its headers, kbuild and source")
        run_tool(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download",
              *(f"{name}={version}" for name in wanted), "busybox-static"],
             cwd=debs, what="apt-get download")
        trees = {"img": [pkg], "hdr": [f"linux-headers-{krel}", *siblings], "src": [source],
                 "bb": ["busybox-static"]}
        for part, names in trees.items():
            for name in names:
                (deb,) = debs.glob(f"{name}_*.deb")
                run_tool(["dpkg-deb", "-x", str(deb), str(work / part)], what=f"dpkg-deb -x {deb.name}")
        shutil.rmtree(debs)

        config = (work / "img" / "boot" / f"config-{krel}").read_text()
        oot = list(OOT_SIMULATORS)
        if not re.search(r"^CONFIG_VDPA=[ym]$", config, re.M):
            oot = list(OOT_CORE) + oot
        top = f"{source}"
        members = sorted({f"{top}/{p}" for _, files in oot for p in files} | {f"{top}/{h}" for h in UAPI_HEADERS})
        (tarball,) = (work / "src" / "usr" / "src").glob(f"{source}.tar.*")
        self.log(f"extracting {len(members)} files from {tarball.name}")
        run_tool(["tar", "-xf", str(tarball), "-C", str(work / "src"), *members], what="tar -x")
        tree = work / "src" / top
        (kit_dir / "include" / "linux").mkdir(parents=True)
        for header in UAPI_HEADERS:
            shutil.copy(tree / header, kit_dir / "include" / "linux" / Path(header).name)

        built = self._compile(work, tree, krel, oot)
        modules = self._collect_modules(work / "img" / "lib" / "modules" / krel, built, krel)
        order = load_order({name: deps for name, (_, deps) in modules.items()})
        init = _INIT.replace("@MODULES@", " ".join(order)).replace("@9P@", NINE_P)
        busybox = (work / "bb" / "bin" / "busybox").read_bytes()
        entries: list[tuple[str, int, bytes, int]] = [
            (d, 0o40755, b"", 0) for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")]
        entries += [("dev/console", 0o20600, b"", 5 << 8 | 1), ("bin/busybox", 0o100755, busybox, 0),
                    ("init", 0o100755, init.encode(), 0)]
        entries += [(f"lib/modules/{name}.ko", 0o100644, modules[name][0], 0) for name in order]
        (kit_dir / "initrd.cpio").write_bytes(newc_archive(entries))
        shutil.copy(work / "img" / "boot" / f"vmlinuz-{krel}", kit_dir / "vmlinuz")
        return {"format": KIT_FORMAT, "package": pkg, "version": version, "krel": krel,
                "modules": order, "built_out_of_tree": sorted(built),
                "debs": wanted + ["busybox-static"]}

    def _compile(self, work: Path, tree: Path, krel: str,
                 oot: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, Path]:
        """Build *oot* against the unpacked headers; module name -> .ko path."""
        build = work / "oot"
        build.mkdir()
        kbuild = []
        for name, files in oot:
            for path in files:
                src = tree / path
                target = f"{name}_main.c" if path.endswith(".c") else src.name
                shutil.copy(src, build / target)
            kbuild += [f"obj-m += {name}.o", f"{name}-y := {name}_main.o"]
        (build / "Kbuild").write_text("\n".join(kbuild) + "\n")
        headers = work / "hdr" / "usr" / "src" / f"linux-headers-{krel}"
        compiler, package = kernel_compiler(headers / ".kernelvariables")
        ensure_tools({compiler: package}, self.log)
        makefile = headers / "Makefile"
        # the headers' Makefile includes the -common tree by its absolute /usr/src path
        makefile.write_text(re.sub(r"^include /usr/src/", f"include {work}/hdr/usr/src/",
                                   makefile.read_text(), flags=re.M))
        self.log(f"compiling {', '.join(name for name, _ in oot)} (-j{self.jobs})")
        # CONFIG_DEBUG_INFO_BTF_MODULES= skips BTF generation, which needs pahole
        run_tool(["make", "-s", "-C", str(headers), f"M={build}", f"-j{self.jobs}",
              "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"], what="out-of-tree module build")
        return {name: build / f"{name}.ko" for name, _ in oot}

    def _collect_modules(self, moddir: Path, built: Mapping[str, Path],
                         krel: str) -> dict[str, tuple[bytes, list[str]]]:
        """KIT_MODULES and their dependency closure: name -> (ko bytes, deps)."""
        index: dict[str, Path] = {}
        for ko in moddir.rglob("*.ko*"):
            index.setdefault(ko.name.split(".ko")[0].replace("-", "_"), ko)
        index.update(built)
        builtin_text = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
        builtin = {Path(line).name.split(".ko")[0].replace("-", "_") for line in builtin_text.split()}
        out: dict[str, tuple[bytes, list[str]]] = {}
        todo = [(name, required) for name, required in KIT_MODULES]
        while todo:
            name, required = todo.pop()
            if name in out:
                continue
            path = index.get(name)
            if path is None:
                if name in builtin or not required:
                    continue
                raise KitBuildError(f"module {name} is neither in {self.package} nor built here")
            data = path.read_bytes()
            if path.suffix == ".xz":
                data = lzma.decompress(data)
            info = modinfo(data)
            if not info.get("vermagic", "").startswith(krel + " "):
                raise KitBuildError(f"{path.name}: vermagic {info.get('vermagic')!r} is not {krel}")
            deps = [d.replace("-", "_") for d in info.get("depends", "").split(",") if d]
            out[name] = (data, deps)
            todo += [(dep, True) for dep in deps]
        return out


def kernel_compiler(kernelvariables: Path) -> tuple[str, str]:
    """The compiler the kernel was built with, from Debian's headers ``.kernelvariables``.

    ``CC = $(if ...) $(CROSS_COMPILE)gcc-12`` with ``CROSS_COMPILE = x86_64-linux-gnu-``
    gives ``("x86_64-linux-gnu-gcc-12", "gcc-12")``: the binary, and the Debian package.
    """
    text = kernelvariables.read_text() if kernelvariables.exists() else ""
    values = {m.group(1): m.group(2).strip() for m in
              re.finditer(r"^(?:override\s+)?([A-Z_]+)\s*[:?]?=\s*(.*)$", text, re.M)}
    cc = values.get("CC", "gcc").split()[-1]
    prefix = values.get("CROSS_COMPILE", "")
    return cc.replace("$(CROSS_COMPILE)", prefix), cc.replace("$(CROSS_COMPILE)", "")


def newest_kernel_package(series: str | None = None) -> str:
    """Newest stock Debian amd64 kernel image apt knows, optionally of *series* (``"6.1"``).

    Without a series this is bookworm's 6.12 line (``linux-image-6.12.N+deb12-amd64``);
    ``"6.1"`` picks bookworm's default kernel (``linux-image-6.1.0-N-amd64``).
    """
    minor = re.escape(series) if series else r"6\.[0-9]+"
    pattern = rf"^linux-image-{minor}\.[0-9]+(-[0-9]+|\+deb[0-9]+)-amd64$"
    text = run_tool(["apt-cache", "search", "--names-only", pattern], what="apt-cache search")
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not names:
        raise KitBuildError(f"apt knows no package matching {pattern} (apt-get update?)")
    return max(names, key=lambda name: version_key(name.removeprefix("linux-image-")))


def is_series(kernel: str) -> bool:
    return re.fullmatch(r"[0-9]+\.[0-9]+", kernel) is not None
