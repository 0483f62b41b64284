"""Host-side checks of the vhost-vdpa wire formats (no vDPA kernel needed).

Every ioctl number is checked twice: against the project's fact sheet
(shared/reference/vhost-vdpa.md, transcribed below) and against the C
compiler evaluating the kernel's own uapi headers (the VM kit's 6.12 headers
when a kit is cached, else the host's linux-libc-dev).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from shadowvmm.backends.base import Capability
from shadowvmm.errors import BackendError, ConfigError
from shadowvmm.memory import GuestMemory
from shadowvmm_vdpa.backend import VdpaBackend, _shared_file_mappings
from shadowvmm_vdpa.ioctl import (
    U64,
    Access,
    BackendFeature,
    Ioctl,
    IotlbMsgV2,
    IotlbType,
    VdpaConfig,
    VdpaIoctlError,
    VringAddrArg,
    VringFile,
    VringState,
)
from shadowvmm_vdpa.netlink import (
    ATTRS,
    Attr21,
    VdpaCmd,
    VdpaMessage,
    VdpaNetlink,
    VdpaNetlinkError,
)
from shadowvmm_vdpa.vm import DEFAULT_CACHE_DIR, ENV_KIT_DIR, Kit

#: Numbers as the fact sheet lists them (section 3).
FACT_SHEET = {
    "VHOST_GET_FEATURES": 0x8008AF00, "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_OWNER": 0x0000AF01, "VHOST_RESET_OWNER": 0x0000AF02,
    "VHOST_SET_VRING_NUM": 0x4008AF10, "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12, "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20, "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_SET_VRING_ERR": 0x4008AF22,
    "VHOST_SET_BACKEND_FEATURES": 0x4008AF25, "VHOST_GET_BACKEND_FEATURES": 0x8008AF26,
    "VHOST_VDPA_GET_DEVICE_ID": 0x8004AF70, "VHOST_VDPA_GET_STATUS": 0x8001AF71,
    "VHOST_VDPA_SET_STATUS": 0x4001AF72, "VHOST_VDPA_GET_CONFIG": 0x8008AF73,
    "VHOST_VDPA_SET_CONFIG": 0x4008AF74, "VHOST_VDPA_SET_VRING_ENABLE": 0x4008AF75,
    "VHOST_VDPA_GET_VRING_NUM": 0x8002AF76, "VHOST_VDPA_SET_CONFIG_CALL": 0x4004AF77,
    "VHOST_VDPA_GET_IOVA_RANGE": 0x8010AF78, "VHOST_VDPA_GET_CONFIG_SIZE": 0x8004AF79,
    "VHOST_VDPA_GET_AS_NUM": 0x8004AF7A, "VHOST_VDPA_GET_VRING_GROUP": 0xC008AF7B,
    "VHOST_VDPA_SET_GROUP_ASID": 0x4008AF7C, "VHOST_VDPA_SUSPEND": 0x0000AF7D,
    "VHOST_VDPA_RESUME": 0x0000AF7E, "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xC008AF7F,
    "VHOST_VDPA_GET_VQS_COUNT": 0x8004AF80, "VHOST_VDPA_GET_GROUP_NUM": 0x8004AF81,
    "VHOST_VDPA_GET_VRING_SIZE": 0xC008AF82,
}

#: Names that only headers newer than Linux 6.1 define.
NEWER_THAN_6_1 = {"VHOST_VDPA_RESUME", "VHOST_VDPA_GET_VRING_DESC_GROUP", "VHOST_VDPA_GET_VRING_SIZE",
                  "VHOST_BACKEND_F_RESUME", "VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK",
                  "VHOST_BACKEND_F_DESC_ASID", "VHOST_BACKEND_F_IOTLB_PERSIST"}

#: struct layouts (size; field -> offset) checked against the compiler.
LAYOUTS = {
    "struct vhost_vring_state": (VringState, {"index": 0, "num": 4}),
    "struct vhost_vring_file": (VringFile, {"index": 0, "fd": 4}),
    "struct vhost_vring_addr": (VringAddrArg, {"index": 0, "flags": 4, "desc_user_addr": 8,
                                               "used_user_addr": 16, "avail_user_addr": 24,
                                               "log_guest_addr": 32}),
    "struct vhost_msg_v2": (IotlbMsgV2, {"type": 0, "asid": 4, "iotlb.iova": 8, "iotlb.size": 16,
                                         "iotlb.uaddr": 24, "iotlb.perm": 32, "iotlb.type": 33}),
}


def header_dirs() -> list[tuple[str, Path]]:
    """uapi header roots to compile against: the cached kit's first, then the host's."""
    roots = []
    cache = Path(os.environ.get(ENV_KIT_DIR) or DEFAULT_CACHE_DIR).expanduser()
    kits = [k for k in (Kit.load(p) for p in sorted(cache.glob("linux-image-*"))) if k]
    for kit in kits:
        roots.append((f"kit {kit.krel}", kit.path / "include"))
    if Path("/usr/include/linux/vhost.h").exists():
        roots.append(("host linux-libc-dev", Path("/usr/include")))
    return roots


def compile_and_run(tmp_path: Path, include: Path, body: str) -> str:
    src = tmp_path / "probe.c"
    exe = tmp_path / "probe"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/vhost.h>\n"
                   "#include <linux/vdpa.h>\nint main(void) {\n" + body + "return 0;\n}\n")
    # raw (not headers_install'ed) uapi headers include <linux/compiler.h>
    stub = tmp_path / "stub" / "linux"
    stub.mkdir(parents=True)
    (stub / "compiler.h").write_text("")
    cc = shutil.which("gcc") or shutil.which("cc")
    built = subprocess.run([cc, "-I", str(include), "-idirafter", str(stub.parent), "-o", str(exe), str(src)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_numbers_match_fact_sheet() -> None:
    assert {i.name for i in Ioctl} == set(FACT_SHEET)
    for ioctl in Ioctl:
        assert ioctl.number == FACT_SHEET[ioctl.name], f"{ioctl.name}: {ioctl.number:#x}"


@pytest.mark.parametrize("source,include", header_dirs() or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no uapi headers on this host"))])
def test_numbers_and_layouts_match_uapi_headers(tmp_path: Path, source: str, include: Path) -> None:
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler")
    names = list(FACT_SHEET) + [f"VHOST_BACKEND_F_{f.name}" for f in BackendFeature]
    body = "".join(f"#ifdef {n}\nprintf(\"{n} %lu\\n\", (unsigned long)({n}));\n#endif\n" for n in names)
    body += "".join(f"printf(\"VHOST_IOTLB_{t.name} %d\\n\", VHOST_IOTLB_{t.name});\n" for t in IotlbType)
    for cname, (_, fields) in LAYOUTS.items():
        body += f"printf(\"sizeof {cname} %zu\\n\", sizeof({cname}));\n"
        body += "".join(f"printf(\"offsetof {cname} {f} %zu\\n\", offsetof({cname}, {f}));\n" for f in fields)
    values: dict[str, int] = {}
    for line in compile_and_run(tmp_path, include, body).splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    missing = [n for n in names if n not in values]
    assert set(missing) <= NEWER_THAN_6_1, f"{source} lacks {missing}"
    for ioctl in Ioctl:
        if ioctl.name in values:
            assert ioctl.number == values[ioctl.name], f"{source}: {ioctl.name}"
    for feature in BackendFeature:
        if f"VHOST_BACKEND_F_{feature.name}" in values:
            assert feature.value == values[f"VHOST_BACKEND_F_{feature.name}"]
    for kind in IotlbType:
        assert kind.value == values[f"VHOST_IOTLB_{kind.name}"]
    for cname, (layout, fields) in LAYOUTS.items():
        assert layout.struct_size() == values[f"sizeof {cname}"], cname
        for fieldname, offset in fields.items():
            assert values[f"offsetof {cname} {fieldname}"] == offset, f"{cname}.{fieldname}"


def _enum_values(header: str, enum_name: str) -> dict[str, int]:
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    body = re.search(r"enum " + enum_name + r"\s*\{(.*?)\};", text, re.S).group(1)
    values: dict[str, int] = {}
    nxt = 0
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        name, _, expr = (p.strip() for p in item.partition("="))
        value = (values[expr] if expr in values else int(expr, 0)) if expr else nxt
        values[name] = value
        nxt = value + 1
    return values


@pytest.mark.parametrize("source,include", header_dirs() or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no uapi headers on this host"))])
def test_netlink_tables_match_uapi_header(source: str, include: Path) -> None:
    header = (include / "linux" / "vdpa.h").read_text()
    commands = _enum_values(header, "vdpa_command")
    for cmd in VdpaCmd:
        if f"VDPA_CMD_{cmd.name}" in commands:
            assert commands[f"VDPA_CMD_{cmd.name}"] == cmd.value
    attrs = {v: k for k, v in _enum_values(header, "vdpa_attr").items() if k != "VDPA_ATTR_PAD"}
    attr_max = attrs.pop(max(attrs))
    assert attr_max == "VDPA_ATTR_MAX"
    layout = Attr21.DEVICE_FEATURES if max(attrs) + 1 <= 22 else Attr21.BLK_CAPACITY
    assert attrs[21] == layout.value, f"{source}: attribute 21 is {attrs[21]}"
    for number, name, _ in ATTRS:
        if number in attrs and number != 21:
            assert attrs[number] == name, f"{source}: attribute {number}"


def test_iotlb_update_bytes() -> None:
    msg = IotlbMsgV2.update(iova=0x10000, size=0x200000, uaddr=0x7F1234560000, perm=Access.RW, asid=1)
    data = msg.pack()
    expected = bytearray(72)
    struct.pack_into("<I", expected, 0, 2)                 # VHOST_IOTLB_MSG_V2
    struct.pack_into("<I", expected, 4, 1)                 # asid
    struct.pack_into("<QQQ", expected, 8, 0x10000, 0x200000, 0x7F1234560000)
    expected[32] = 3                                       # VHOST_ACCESS_RW
    expected[33] = 2                                       # VHOST_IOTLB_UPDATE
    assert data == bytes(expected)
    assert IotlbMsgV2.unpack(data) == msg


@pytest.mark.parametrize("factory,kind", [
    (IotlbMsgV2.batch_begin, 5), (IotlbMsgV2.batch_end, 6)])
def test_iotlb_batch_bytes(factory, kind) -> None:
    assert factory().pack() == b"\x02\0\0\0" + bytes(28) + bytes([0, kind]) + bytes(38)


def test_iotlb_invalidate_bytes() -> None:
    data = IotlbMsgV2.invalidate(0x4000, 0x1000).pack()
    assert data[:8] == b"\x02\0\0\0\0\0\0\0"
    assert struct.unpack_from("<QQQBB", data, 8) == (0x4000, 0x1000, 0, 0, 3)


def test_iotlb_write_is_one_72_byte_write() -> None:
    r, w = os.pipe()
    try:
        IotlbMsgV2.batch_begin().write(w)
        assert os.read(r, 100) == IotlbMsgV2.batch_begin().pack()
    finally:
        os.close(r)
        os.close(w)


def test_argument_layouts() -> None:
    assert VringState(3, 256).pack() == struct.pack("<II", 3, 256)
    assert VringFile(1, -1).pack() == struct.pack("<Ii", 1, -1)
    assert VringAddrArg(2, 0, 0x1000, 0x3000, 0x2000).pack() == struct.pack("<IIQQQQ", 2, 0, 0x1000,
                                                                             0x3000, 0x2000, 0)
    cfg = VdpaConfig(4, 2, b"\x01\x02")
    assert cfg.pack() == struct.pack("<II", 4, 2) + b"\x01\x02"
    assert VdpaConfig.unpack(cfg.pack()) == cfg
    assert U64(0x17E).pack() == (0x17E).to_bytes(8, "little")


def test_backend_features_are_bit_numbers() -> None:
    assert BackendFeature.IOTLB_MSG_V2.mask == 0x2
    # 6.12 vdpasim_net offers 0x17e: MSG_V2, BATCH, ASID, SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK, PERSIST
    assert BackendFeature.decode(0x17E) == ["IOTLB_MSG_V2", "IOTLB_BATCH", "IOTLB_ASID", "SUSPEND",
                                           "RESUME", "ENABLE_AFTER_DRIVER_OK", "IOTLB_PERSIST"]


def test_ioctl_error_carries_errno() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(VdpaIoctlError) as info:
            Ioctl.VHOST_GET_FEATURES.call(fd)
        assert info.value.errno == errno.ENOTTY
        assert info.value.operation == "VHOST_GET_FEATURES"
        assert isinstance(info.value, BackendError)
    finally:
        os.close(fd)


def test_ioctl_rejects_wrong_argument_type() -> None:
    with pytest.raises(TypeError):
        Ioctl.VHOST_SET_VRING_NUM.call(0, VringFile(0, 1))


def test_only_shared_file_mappings_qualify() -> None:
    memory = GuestMemory.create([(0, 1 << 16)])
    anon = mmap.mmap(-1, 1 << 16, mmap.MAP_PRIVATE)
    try:
        import ctypes
        anon_addr = ctypes.addressof(ctypes.c_char.from_buffer(anon))
        spans = _shared_file_mappings()
        region = memory.regions[0]
        assert any(s <= region.host_addr and region.host_addr + region.size <= e for s, e in spans)
        assert not any(s <= anon_addr < e for s, e in spans)
    finally:
        memory.close()
        anon.close()


async def test_backend_config_and_missing_node(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        VdpaBackend({"device": "net"})
    with pytest.raises(ConfigError):
        VdpaBackend({"path": "/dev/vhost-vdpa-0", "device": "gpu"})
    backend = VdpaBackend({"path": str(tmp_path / "vhost-vdpa-9"), "device": "blk"})
    assert backend.capabilities() == Capability.CONFIG | Capability.STATUS | Capability.MQ | Capability.EVENTS
    with pytest.raises(VdpaIoctlError) as info:
        await backend.connect()
    assert info.value.errno == errno.ENOENT


def test_dev_new_message_bytes() -> None:
    msg = VdpaMessage()
    msg["cmd"] = VdpaCmd.DEV_NEW
    msg["version"] = 1
    msg["attrs"] = [("VDPA_ATTR_MGMTDEV_DEV_NAME", "vdpasim_net"), ("VDPA_ATTR_DEV_NAME", "vdpa0"),
                    ("VDPA_ATTR_DEV_NET_CFG_MACADDR", "02:00:00:00:00:01"),
                    ("VDPA_ATTR_DEV_NET_CFG_MTU", 1400), ("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", 1)]
    msg.encode()
    payload = bytes(msg.data[16:])            # after nlmsghdr
    assert payload[:4] == bytes([VdpaCmd.DEV_NEW, 1, 0, 0])

    def nla(kind: int, value: bytes) -> bytes:
        raw = struct.pack("<HH", 4 + len(value), kind) + value
        return raw + bytes(-len(raw) % 4)

    assert payload[4:] == (nla(2, b"vdpasim_net\0") + nla(4, b"vdpa0\0") + nla(10, bytes([2, 0, 0, 0, 0, 1]))
                           + nla(13, struct.pack("<H", 1400)) + nla(12, struct.pack("<H", 1)))


@pytest.mark.parametrize("layout", list(Attr21))
def test_attribute_21_is_read_per_kernel_layout(layout: Attr21) -> None:
    attrs = {"VDPA_ATTR_DEV_NAME": "vdpa0", "VDPA_ATTR_DEV_ID": 1, "VDPA_ATTR_21": 0x308820028,
             "VDPA_ATTR_DEV_NET_CFG_MTU": 1400}
    config = VdpaNetlink.decode_config(attrs, layout)
    if layout is Attr21.DEVICE_FEATURES:
        assert (config.device_features, config.blk_capacity) == (0x308820028, None)
    else:
        assert (config.device_features, config.blk_capacity) == (None, 0x308820028)
    assert config.raw[layout.value] == 0x308820028
    assert config.mtu == 1400


async def test_netlink_without_vdpa_family_is_typed() -> None:
    if Path("/sys/bus/vdpa").exists():
        pytest.skip("this kernel has vDPA")
    with pytest.raises(VdpaNetlinkError) as info:
        async with VdpaNetlink():
            pass
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, BackendError)
