"""pytest plugin (entry point ``pytest11: shadowvmm``): device and peer fixtures, markers, reports.

Installed with ``pip install 'shadowvmm[pytest]'`` (pytest and pytest-asyncio) it needs no
configuration in the user's project:

* the device fixtures of :mod:`shadowvmm.testing.fixtures` (``vhost_user_device``,
  ``vhost_user_daemon``, ``qsd_blk``, ``virtiofsd_fs``, ``dpdk_net``,
  ``reference_backend``; ``vdpa_sim`` comes with the ``shadowvmm-vdpa`` plugin), and the
  peer fixtures below, which yield a started peer without a device;
* markers: ``peer(name, ...)`` - the test needs those peer executables
  (``qemu-storage-daemon``, ``virtiofsd``, ``dpdk-testpmd``, ``qemu-img``);
  ``shadowvmm_trace`` - keep the vhost-user message trace of a test that builds its
  devices itself; ``leaks_fds`` - exempt from :mod:`shadowvmm.testing.leaks`;
* pytest-asyncio in ``auto`` mode, async fixtures on the tests' event loop (function
  scope unless the project sets ``asyncio_default_test_loop_scope``), unless the project
  chose a mode or a fixture loop scope itself;
* when a test fails, its report gets a section with the last vhost-user messages
  (``--shadowvmm-trace-messages``, default 50) and one with the tail of each peer's log
  (``--shadowvmm-log-lines``, default 40).

Every fixture is function-scoped, starts its peer in the test's ``tmp_path`` and stops and
reaps it at teardown. A missing peer skips the test, except when ``CI=true``: in CI a
missing peer is a failure, never a silent skip.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from .peers import DpdkTestpmd, QsdBlk, Virtiofsd
from .report import DEFAULT_LOG_LINES, attach_trace, detach_trace, failure_sections, record_peer
from .requires import in_ci, require_peer
from .trace import DEFAULT_MESSAGES, TraceOnlyFilter

ASYNC_FIXTURES: Final = ("dpdk_net", "qsd_blk", "reference_backend", "vhost_user_daemon", "vhost_user_device",
                         "virtiofsd_fs")
HAS_PYTEST_ASYNCIO: Final = importlib.util.find_spec("pytest_asyncio") is not None

if HAS_PYTEST_ASYNCIO:
    from .fixtures import (  # noqa: F401  (fixtures are found by name in this module)
        dpdk_net,
        qsd_blk,
        reference_backend,
        vhost_user_daemon,
        vhost_user_device,
        virtiofsd_fs,
    )
else:
    def _needs_pytest_asyncio(name: str) -> Any:
        @pytest.fixture(name=name)
        def fixture() -> None:
            pytest.fail(f"the {name} fixture needs pytest-asyncio: pip install 'shadowvmm[pytest]'", pytrace=False)
        return fixture

    for _name in ASYNC_FIXTURES:
        globals()["_missing_" + _name] = _needs_pytest_asyncio(_name)

__all__ = ["ASYNC_FIXTURES", "in_ci", "qsd_blk_file", "qsd_blk_null", "require_peer", "testpmd", "virtiofsd"]

QSD_FILE_SIZE = 64 << 20
QSD_NULL_SIZE = 1 << 30
QSD_QUEUES = 2
SHARE_FILE = "hello.txt"
SHARE_TEXT = b"hello\n"

#: Tests using one of these get a vhost-user message trace (their devices speak vhost-user).
TRACED_FIXTURES: Final = frozenset({*ASYNC_FIXTURES, "qsd_blk_file", "qsd_blk_null", "virtiofsd", "testpmd"})

MARKERS: Final = (
    "peer(*names): needs these real peer executables (qemu-storage-daemon, virtiofsd, dpdk-testpmd, "
    "qemu-img); a missing one skips the test, and fails it under CI=true",
    "shadowvmm_trace: keep the vhost-user message trace of this test (shown if it fails)",
    "leaks_fds: the test keeps fds open on purpose (exempt from shadowvmm.testing.leaks)",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shadowvmm")
    group.addoption("--shadowvmm-trace-messages", type=int, default=DEFAULT_MESSAGES, metavar="N",
                    help="vhost-user messages shown in a failing test's report (default %(default)s)")
    group.addoption("--shadowvmm-log-lines", type=int, default=DEFAULT_LOG_LINES, metavar="N",
                    help="lines of each peer's log shown in a failing test's report (default %(default)s)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    if HAS_PYTEST_ASYNCIO:
        _asyncio_defaults(config)


def _asyncio_defaults(config: pytest.Config) -> None:
    """``asyncio_mode=auto`` unless the project chose a mode (pytest-asyncio reads it from
    ``config.option`` first, then from the ini file), and, unless set, async fixtures run in
    the tests' event loop (``asyncio_default_fixture_loop_scope`` = the test loop scope,
    ``function`` by default): a device a fixture built is used on the loop it was built on."""
    if config.getoption("asyncio_mode", None) is None and not _ini_given(config, "asyncio_mode"):
        config.option.asyncio_mode = "auto"
    try:
        scope = config.getini("asyncio_default_fixture_loop_scope")
    except ValueError:              # pytest-asyncio < 0.24 has no such setting
        return
    if scope:
        return
    try:
        test_scope = config.getini("asyncio_default_test_loop_scope") or "function"
    except ValueError:              # pytest-asyncio < 0.26: tests run in a function loop
        test_scope = "function"
    cache = getattr(config, "_inicache", None)
    if isinstance(cache, dict):
        cache["asyncio_default_fixture_loop_scope"] = test_scope


def _ini_given(config: pytest.Config, name: str) -> bool:
    """Whether the project's configuration (or ``-o``) sets *name* (pytest 8 and 9)."""
    given: Any = getattr(config, "_inicfg", None)
    if given is None:
        given = config.inicfg
    overrides = getattr(config, "_override_ini", None) or ()
    return name in given or any(str(o).split("=", 1)[0].strip() == name for o in overrides)


#: pytest's logging plugin handlers that get the filter dropping trace-only records.
LOG_CAPTURE_HANDLERS: Final = ("caplog_handler", "report_handler", "log_file_handler", "log_cli_handler")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Keep the vhost-user trace out of pytest's captured logs (it has its own section)."""
    logging_plugin = session.config.pluginmanager.get_plugin("logging-plugin")
    if logging_plugin is None:
        return
    for attribute in LOG_CAPTURE_HANDLERS:
        handler = getattr(logging_plugin, attribute, None)
        if isinstance(handler, logging.Handler):
            handler.addFilter(TraceOnlyFilter())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("peer"):
        for name in mark.args:
            require_peer(str(name))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    names = set(getattr(item, "fixturenames", ()))
    if names & TRACED_FIXTURES or item.get_closest_marker("shadowvmm_trace") is not None:
        attach_trace(item, item.config.getoption("shadowvmm_trace_messages"))
    try:
        return (yield)
    finally:
        detach_trace(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        report.sections.extend(failure_sections(item, item.config.getoption("shadowvmm_log_lines")))
    return report


@pytest.fixture
def qsd_blk_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QsdBlk]:
    """qemu-storage-daemon exporting a fresh 64 MiB sparse raw image, 2 queues, writable."""
    binary = require_peer("qemu-storage-daemon")
    peer = QsdBlk(
        tmp_path, image=tmp_path / "disk.img", size=QSD_FILE_SIZE, create=True, num_queues=QSD_QUEUES, binary=binary
    )
    with record_peer(request.node, peer):
        yield peer


@pytest.fixture
def qsd_blk_null(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QsdBlk]:
    """qemu-storage-daemon exporting ``null-co`` (1 GiB, ``read-zeroes=off``), 2 queues."""
    binary = require_peer("qemu-storage-daemon")
    peer = QsdBlk(tmp_path, size=QSD_NULL_SIZE, num_queues=QSD_QUEUES, name="qsd-null", binary=binary)
    with record_peer(request.node, peer):
        yield peer


@pytest.fixture
def virtiofsd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Virtiofsd]:
    """A one-shot virtiofsd sharing ``tmp_path/share`` (contains ``hello.txt`` = ``b"hello\\n"``)."""
    binary = require_peer("virtiofsd")
    share = tmp_path / "share"
    share.mkdir()
    (share / SHARE_FILE).write_bytes(SHARE_TEXT)
    peer = Virtiofsd(tmp_path, source=share, binary=binary)
    with record_peer(request.node, peer):
        yield peer


@pytest.fixture
def testpmd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DpdkTestpmd]:
    """dpdk-testpmd vhost-user net backend in io mode, warmed up, forwarding started.

    io forwarding echoes every frame the frontend transmits back into its
    receive queue; it busy-polls one lcore while started.
    """
    binary = require_peer("dpdk-testpmd")
    peer = DpdkTestpmd(tmp_path, forward_mode="io", binary=binary)
    with record_peer(request.node, peer):
        peer.start_forwarding()
        yield peer
