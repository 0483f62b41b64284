"""The source side of a migration (:func:`migrate_out`), one method per phase of :mod:`.migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..device import VirtioDevice
from ..device.eager import start_eager
from ..errors import DestinationRefused, MigrationError, ShadowVmmError, StopTimeoutError, StreamError
from ..memory import DirtyLog, GuestMemory
from ..shadow import RunState
from ..timeline import EventKind, Tap
from .blockers import refuse_if_blocked
from .iommu import IommuTables
from .options import DEFAULT_OPTIONS, MachineLike, MigrationHooks, MigrationOptions, busy_polling, call_hook, gc_paused
from .pages import Outcome, final_pages, memory_digest, memory_identity, memory_layout, precopy, send_pages
from .report import MigrationReport, check_confirmation
from .stream import Channel, RecordType, StreamReader, StreamWriter

log = logging.getLogger(__name__)

Confirm = Callable[[], Awaitable[dict[str, Any] | None]]


async def stop_all(devices: Mapping[str, VirtioDevice], bound: float,
                   clock: Callable[[], float]) -> dict[str, float]:
    """Stop every device at once; raise :class:`StopTimeoutError` if any misses *bound*.

    A device that is late is not cancelled (a half-done stop would leave it
    inconsistent): the caller waits for it and resumes everything. No garbage collection
    runs meanwhile (:func:`~.options.gc_paused`). Each device's stop starts
    at once in this task where its backend allows (:func:`~shadowvmm.device.eager.start_eager`),
    and one that must wait gets a task; each counts itself down as it ends: no completion
    callback, which asyncio runs as one more loop callback per task (``asyncio.wait`` adds one
    per task and a loop hop for each).
    """
    if not devices:
        return {}
    with gc_paused():
        return await _stop_all(devices, bound, clock)


async def _stop_all(devices: Mapping[str, VirtioDevice], bound: float,
                    clock: Callable[[], float]) -> dict[str, float]:
    started = clock()
    times: dict[str, float] = {}
    failures: dict[str, BaseException] = {}
    loop = asyncio.get_running_loop()
    all_done: asyncio.Future[None] = loop.create_future()
    left = len(devices)

    async def one(name: str, device: VirtioDevice) -> None:
        nonlocal left
        try:
            await device.stop()
        except Exception as exc:
            failures[name] = exc
        finally:
            times[name] = clock() - started
            left -= 1
            if not left and not all_done.done():
                all_done.set_result(None)

    def bound_passed() -> None:
        if not all_done.done():
            all_done.set_result(None)

    tasks = {}
    for name, device in devices.items():
        task = start_eager(loop, one(name, device), device.ops_start_eagerly)
        if task is not None:
            tasks[name] = task
    if left:
        timer = loop.call_later(bound, bound_passed)
        try:
            await all_done
        finally:
            timer.cancel()
    pending = [name for name, task in tasks.items() if not task.done()]
    if pending or failures:
        if pending:
            await asyncio.wait([tasks[name] for name in pending])
        late = {name: times.get(name, clock() - started) for name in pending}
        late.update({name: took for name, took in times.items() if name not in pending and took > bound})
        if failures and not late:
            name, exc = next(iter(failures.items()))
            raise MigrationError(f"device {name} failed to stop: {exc}") from exc
        raise StopTimeoutError(late, bound)
    return times


async def resume_all(devices: Mapping[str, VirtioDevice]) -> None:
    async def one(name: str, device: VirtioDevice) -> None:
        try:
            if device.run_state is RunState.STOPPED:
                await device.resume()
        except (ShadowVmmError, OSError) as exc:
            log.error("%s: resume after abandoned migration failed: %s", name, exc)
    await asyncio.gather(*(one(n, d) for n, d in devices.items()))


async def stop_logging(devices: Mapping[str, VirtioDevice], memory: GuestMemory, logging_on: bool) -> None:
    if not logging_on:
        return

    async def one(name: str, device: VirtioDevice) -> None:
        try:
            await device.stop_dirty_log()
        except (ShadowVmmError, OSError) as exc:
            log.warning("%s: turning dirty logging off failed: %s", name, exc)
    await asyncio.gather(*(one(n, d) for n, d in devices.items()))
    memory.disable_dirty_log()


async def read_result(reply: StreamReader) -> dict[str, Any]:
    """The destination's RESULT, read as soon as it arrives (a refusal can come at any time)."""
    return (await reply.expect(RecordType.RESULT)).decode()


def check_outcome(outcome: Outcome | None) -> None:
    """Before END the destination has nothing to answer: a RESULT now is a refusal, even an ok one."""
    if outcome is None or not outcome.done():
        return
    exc = outcome.exception()
    if exc is not None:
        raise DestinationRefused(f"destination went away: {exc}") from exc
    result = outcome.result()
    if not result.get("ok"):
        raise DestinationRefused(f"destination refused: {result.get('error')}")
    raise DestinationRefused("destination answered RESULT ok before the stream ended; nothing was confirmed")


async def destination_reason(outcome: Outcome | None) -> str | None:
    """The destination's RESULT error, if it sent one before the stream broke."""
    if outcome is None:
        return None
    try:
        async with asyncio.timeout(0.5):
            result = await asyncio.shield(outcome)
    except (StreamError, TimeoutError, OSError):
        return None
    return None if result.get("ok") else str(result.get("error"))


class Outgoing:
    """One outgoing migration: what each phase leaves for the next, and for :meth:`abandon`."""

    def __init__(self, machine: MachineLike, channel: Channel, options: MigrationOptions,
                 hooks: MigrationHooks, clock: Callable[[], float], timeline: Tap | None = None) -> None:
        self.machine, self.channel, self.options, self.hooks, self.clock = machine, channel, options, hooks, clock
        self.timeline = timeline
        self.memory = machine.memory
        self.devices = {name: slot.device for name, slot in machine.slots.items()}
        self.report = MigrationReport(options.mode)
        self.writer = StreamWriter(channel, send_timeout=options.send_timeout)
        self.reply = StreamReader(channel) if channel.duplex else None
        self.outcome: Outcome | None = None
        self.dirty_log: DirtyLog | None = None
        self.pending: set[int] = set()
        self.logging_on = self.stopped = self.paused = False
        self.polling = contextlib.ExitStack()
        self.t0 = self.t_stop = 0.0

    def check(self) -> None:
        check_outcome(self.outcome)

    async def setup(self) -> None:
        """HELLO; the destination's READY (duplex); dirty logging on (copy model)."""
        self.t0 = self.clock()
        options, memory, devices = self.options, self.memory, self.devices
        await self.writer.start()
        await self.writer.write_map(RecordType.HELLO, {
            "mode": options.mode, "memory": memory_layout(memory),
            "identity": memory_identity(memory) if options.mode == "local" else [],
            "devices": [{"name": n, "device_id": int(d.device_id), "queues": d.num_queues,
                         "preview": d.start_preview()} for n, d in devices.items()]})
        if self.reply is not None:
            async with asyncio.timeout(options.ready_timeout):
                await self.reply.start()
                first = await self.reply.expect(RecordType.READY, RecordType.RESULT)
                ready = first.decode()
            if first.type is not RecordType.READY or not ready.get("ok"):
                raise DestinationRefused(f"destination refused at setup: {ready.get('error')}")
            self.outcome = asyncio.ensure_future(read_result(self.reply))
        if options.mode == "copy":
            dlog = memory.enable_dirty_log()
            self.logging_on = True
            self.dirty_log = dlog
            await asyncio.gather(*(d.start_dirty_log(dlog) for d in devices.values()))
        self.report.setup_ms = (self.clock() - self.t0) * 1e3
        log.info("migration setup: %s model, %d device(s) %s, %.1f ms", options.mode, len(devices),
                 sorted(devices), self.report.setup_ms)

    async def precopy(self) -> None:
        """Copy model: the pre-copy rounds, then the blockers again (the guest ran meanwhile)."""
        if self.dirty_log is None:
            return
        t_pre = self.clock()
        self.dirty_log.take()
        await precopy(self.memory, self.writer, self.dirty_log, self.options, self.hooks, self.report,
                      self.pending, self.clock, self.check, self.timeline)
        self.report.precopy_ms = (self.clock() - t_pre) * 1e3
        await refuse_if_blocked(self.devices, self.options.mode, self.options.fs_session)

    async def stop(self) -> None:
        """The guest paused, every device stopped at once within the bound."""
        self.check()
        await call_hook(self.hooks.pause_guest)
        self.paused = True
        self.t_stop = self.clock()
        self.stopped = True
        self.polling.enter_context(gc_paused())     # until the switch-over, or the source resumed
        self.polling.enter_context(busy_polling(self.devices.values(),
                                                self.options.busy_poll_seconds(len(self.devices))))
        stopped = await stop_all(self.devices, self.options.stop_timeout, self.clock)
        self.report.stop_ms_per_device = {name: seconds * 1e3 for name, seconds in stopped.items()}
        self.report.stop_ms = (self.clock() - self.t_stop) * 1e3
        log.info("devices stopped in %.3f ms", self.report.stop_ms)

    async def send_state(self) -> dict[str, Any]:
        """The final dirty pages, each device's state and END; returns what the destination must confirm."""
        options, report, writer = self.options, self.report, self.writer
        final: list[tuple[int, bytes]] = []
        if self.dirty_log is not None:
            self.pending.update(self.dirty_log.take())
            final = final_pages(self.memory, self.pending)
        if options.digest:
            report.memory_digest = memory_digest(self.memory)
        states = await asyncio.gather(*(slot.device.export_state(slot.transport,
                                                                 include_opaque=options.include_opaque)
                                        for slot in self.machine.slots.values()))
        self.check()
        await send_pages(writer, final, options.batch_pages)
        report.pages_sent += len(final)
        tables = IommuTables.of(self.machine)
        if tables.tables:
            await writer.write(RecordType.IOMMU, tables.pack())
        sent: dict[str, str] = {}
        for state in states:
            blob = state.pack()
            sent[state.name] = hashlib.sha256(blob).hexdigest()    # = state.digest(): packed at its format
            report.device_state_bytes += len(blob)
            await writer.write(RecordType.DEVICE, blob)
        self.check()
        await writer.end()
        log.info("device state sent: %d device(s), %d bytes, %d final page(s)", len(states),
                 report.device_state_bytes, len(final))
        return {"devices": sent, "pages": report.pages_sent if options.mode == "copy" else 0}

    async def confirm(self, expected: dict[str, Any], confirm: Confirm | None) -> None:
        """The destination's RESULT (duplex), or *confirm* (one-way), checked against *expected*."""
        report = self.report
        if self.outcome is not None:
            async with asyncio.timeout(self.options.result_timeout):
                result = await asyncio.shield(self.outcome)
            if not result.get("ok"):
                raise DestinationRefused(f"destination refused: {result.get('error')}")
            destination = result.get("report")
            report.destination = dict(destination) if isinstance(destination, dict) else {}
            check_confirmation(report.destination.get("applied"), expected)
            report.confirmed = True
        elif confirm is not None:
            await self.channel.close()
            destination = await confirm()
            report.destination = dict(destination) if isinstance(destination, dict) else {}
            check_confirmation(report.destination.get("applied"), expected)
            report.confirmed = True
        else:
            await self.channel.close()
        report.downtime_ms = (self.clock() - self.t_stop) * 1e3
        log.info("downtime %.3f ms (stop %.3f ms), destination %s", report.downtime_ms,
                 report.stop_ms, "confirmed" if report.confirmed else "not asked to confirm")

    async def abandon(self, exc: BaseException) -> MigrationError | None:
        """Put the source back as it was after *exc*; the error to raise from it (None: *exc* itself)."""
        outcome = self.outcome
        reason = await destination_reason(outcome) if isinstance(exc, StreamError) else None
        log.warning("migration abandoned: %s", exc)
        if self.stopped:
            await resume_all(self.devices)
        if self.paused:
            await call_hook(self.hooks.resume_guest)
        await stop_logging(self.devices, self.memory, self.logging_on)
        try:
            async with asyncio.timeout(1.0):
                await self.writer.write_map(RecordType.ABORT, {"reason": str(exc)})
        except (StreamError, TimeoutError, OSError):
            pass
        try:
            await self.channel.abort()
        except OSError:
            pass
        self.polling.close()
        if outcome is not None:
            outcome.cancel()
            if not outcome.cancelled() and outcome.done():
                outcome.exception()
        if reason is not None:
            return DestinationRefused(f"destination refused: {reason}; source resumed")
        if isinstance(exc, MigrationError):
            return None
        if isinstance(exc, TimeoutError):
            return MigrationError("migration abandoned: the destination did not answer in time; source resumed")
        if isinstance(exc, (ShadowVmmError, OSError)):
            return MigrationError(f"migration abandoned, source resumed: {exc}")
        return None

    async def finish(self) -> MigrationReport:
        """Cleanup after a confirmed migration: the devices stay stopped, dirty logging is off."""
        self.polling.close()
        if self.logging_on:
            self.memory.disable_dirty_log()
        report = self.report
        report.bytes_sent = self.writer.bytes
        report.ok = True
        report.total_ms = (self.clock() - self.t0) * 1e3
        if self.channel.duplex:
            await self.channel.close()
        log.info("migration complete: %.1f ms in all, %d round(s), %d pages, %d bytes sent",
                 report.total_ms, report.rounds, report.pages_sent, report.bytes_sent)
        return report


def _phases(timeline: Tap | None) -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """A phase recorder for *timeline*, or one recording nothing."""
    if timeline is None:
        return lambda _name: contextlib.nullcontext()
    return timeline.phase


async def migrate_out(machine: MachineLike, channel: Channel, options: MigrationOptions = DEFAULT_OPTIONS,
                      hooks: MigrationHooks | None = None, *, confirm: Confirm | None = None,
                      clock: Callable[[], float] = time.perf_counter,
                      timeline: Tap | None = None) -> MigrationReport:
    """Migrate *machine*'s devices (and memory in the copy model) over *channel*.

    The migration is complete only once the destination confirmed what it
    applied: its RESULT carries each device state's digest and the pages it
    wrote (:func:`~.report.applied`), compared with what was sent
    (:func:`~.report.check_confirmation`); a RESULT before END, a missing or a
    different confirmation is a refusal. On a one-way channel (a file) the
    stream is closed after END and *confirm* is awaited in place of RESULT:
    it returns the destination's report (whose ``applied`` is checked the
    same way) or raises to refuse; without *confirm* the report says
    ``confirmed=False``. Any failure resumes the source and raises
    :class:`MigrationError` (the cause chained).

    *timeline* (a :class:`~shadowvmm.timeline.Tap`, e.g. ``timeline.tap("L0", "migration")``)
    gets the phases (setup, pre-copy, stop-and-copy, switch-over), each PRECOPY_ROUND and the
    SWITCH_OVER.
    """
    options.validate()
    run = Outgoing(machine, channel, options, hooks or MigrationHooks(), clock, timeline)
    await refuse_if_blocked(run.devices, options.mode, options.fs_session)
    phase = _phases(timeline)
    try:
        with phase("setup"):
            await run.setup()
        with phase("pre-copy"):
            await run.precopy()
        with phase("stop-and-copy"):
            await run.stop()
            expected = await run.send_state()
            await run.confirm(expected, confirm)
        if timeline is not None:
            timeline.record(EventKind.SWITCH_OVER, downtime_ms=round(run.report.downtime_ms, 3))
        with phase("switch-over"):
            await call_hook(run.hooks.switch_over)
    except BaseException as exc:
        error = await run.abandon(exc)
        if error is None:
            raise
        raise error from exc
    return await run.finish()
