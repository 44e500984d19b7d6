"""Routines and the supervisor: order, deadlines, crashes, signals (injected, never real here)."""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import pytest

from buffer.routines import PeriodicRoutine, Routine, Supervisor


class Recorder(Routine):
    def __init__(self, name: str, log: list[str], *, crash: BaseException | None = None,
                 stop_hangs: bool = False, fail_start: bool = False) -> None:
        self.name = name
        self.log = log
        self.crash = crash
        self.stop_hangs = stop_hangs
        self.fail_start = fail_start
        self._stop = asyncio.Event()

    def stop_budget(self) -> float | None:
        return 0.1

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("port in use")
        self.log.append(f"start {self.name}")

    async def run(self) -> None:
        if self.crash is not None:
            await asyncio.sleep(0.01)
            raise self.crash
        await self._stop.wait()
        self.log.append(f"ran {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.stop_hangs:
            await asyncio.sleep(3600)
        self._stop.set()


async def test_starts_in_order_and_stops_in_reverse() -> None:
    log: list[str] = []
    sup = Supervisor([Recorder("a", log), Recorder("b", log), Recorder("c", log)], signals=())
    runner = asyncio.create_task(sup.run())
    await asyncio.sleep(0.01)
    sup.request_stop()
    assert await runner is True
    assert log == ["start a", "start b", "start c", "stop c", "ran c", "stop b", "ran b", "stop a", "ran a"]


async def test_a_crash_stops_everything_and_is_reported() -> None:
    log: list[str] = []
    crashed: list[str] = []
    sup = Supervisor([Recorder("a", log), Recorder("b", log, crash=ValueError("boom"))], signals=(),
                     on_crash=lambda r, e: crashed.append(f"{r.name}: {e}"))
    assert await asyncio.wait_for(sup.run(), 5) is False
    assert crashed == ["b: boom"]
    assert "stop a" in log
    assert [name for name, _ in sup.crashed] == ["b"]


async def test_a_stop_that_overruns_its_deadline_is_cancelled_not_awaited_forever() -> None:
    log: list[str] = []
    sup = Supervisor([Recorder("a", log), Recorder("slow", log, stop_hangs=True)], signals=())
    runner = asyncio.create_task(sup.run())
    await asyncio.sleep(0.01)
    sup.request_stop()
    assert await asyncio.wait_for(runner, 5) is True
    assert log[-2:] == ["stop a", "ran a"], "the routines after the slow one still stop"


async def test_failed_start_stops_what_already_started() -> None:
    log: list[str] = []
    sup = Supervisor([Recorder("a", log), Recorder("b", log, fail_start=True), Recorder("c", log)], signals=())
    assert await asyncio.wait_for(sup.run(), 5) is False
    assert log == ["start a", "stop a", "ran a"]


async def test_signal_handling_first_starts_shutdown_second_forces_exit() -> None:
    log: list[str] = []
    seen: list[str] = []
    forced: list[bool] = []
    sup = Supervisor([Recorder("a", log)], signals=(), on_signal=lambda s: seen.append(s.name),
                     force_exit=lambda: forced.append(True))
    runner = asyncio.create_task(sup.run())
    await asyncio.sleep(0.01)
    sup._handle_signal(signal.SIGTERM)
    sup._handle_signal(signal.SIGINT)
    await asyncio.wait_for(runner, 5)
    assert seen == ["SIGTERM"] and forced == [True]


async def test_cancellation_of_the_supervisor_is_not_a_crash() -> None:
    log: list[str] = []
    sup = Supervisor([Recorder("a", log)], signals=())
    runner = asyncio.create_task(sup.run())
    await asyncio.sleep(0.01)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert sup.crashed == []


async def test_periodic_runs_on_the_fake_clock_and_reports_errors() -> None:
    calls: list[int] = []
    sleeps: list[float] = []
    routine: PeriodicRoutine

    async def handler() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ConnectionError("clickhouse down")

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:
            await routine.stop()
        await asyncio.sleep(0)

    routine = PeriodicRoutine("refresh", 30.0, handler, "refresh failed", initial_delay=5.0, sleep=fake_sleep)
    await asyncio.wait_for(routine.run(), 5)
    assert sleeps == [5.0, 30.0, 30.0, 30.0]
    assert calls == [0, 1, 2]
    assert routine.errors == 1 and routine.runs == 3


async def test_periodic_stops_promptly_with_the_real_clock() -> None:
    async def handler() -> None:
        pass

    routine = PeriodicRoutine("tick", 3600, handler, "tick failed")
    task = asyncio.create_task(routine.run())
    await asyncio.sleep(0.01)
    await routine.stop()
    await asyncio.wait_for(task, 1)
    assert routine.runs == 1


async def test_admin_drain_route_answers_only_loopback_callers() -> None:
    from buffer.admin import AdminServer

    async def ok(_: bytes) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"drained\n"

    server = AdminServer("127.0.0.1", 0, {("POST", "/drain"): ok, ("GET", "/readyz"): ok},
                         local_only=frozenset({("POST", "/drain")}))
    assert (await server.respond("POST", "/drain", "10.1.2.3", b""))[0] == 403
    assert (await server.respond("POST", "/drain", "::ffff:10.1.2.3", b""))[0] == 403
    assert (await server.respond("POST", "/drain", "127.0.0.5", b""))[0] == 200
    assert (await server.respond("POST", "/drain", "::ffff:127.0.0.1", b""))[0] == 200
    assert (await server.respond("GET", "/readyz", "10.1.2.3", b""))[0] == 200, "probes come from the kubelet, off-host"
    assert (await server.respond("GET", "/drain", "127.0.0.1", b""))[0] == 405
    assert (await server.respond("GET", "/nope", "127.0.0.1", b""))[0] == 404
    # And on a real port, from this host:
    await server.start()
    try:
        def post() -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/drain", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status)

        assert await asyncio.to_thread(post) == 200
    finally:
        await server.stop()


async def test_library_retry_chatter_is_filtered_but_errors_pass() -> None:
    import logging

    from buffer.logs import _QuietLibraries

    f = _QuietLibraries()

    def rec(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, "", 0, "msg", (), None)

    assert not f.filter(rec("urllib3.connectionpool", logging.WARNING))
    assert f.filter(rec("urllib3.connectionpool", logging.ERROR))
    assert f.filter(rec("buffer.flusher", logging.WARNING))
