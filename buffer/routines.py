"""Background routines and the supervisor that runs them.

A routine has a name, starts, runs, and stops within a deadline. The supervisor starts routines in
order, waits for a stop signal (SIGTERM/SIGINT), a cancellation, or a routine that ends on its own,
then stops them in reverse order — so the ingest server stops taking writes before the flusher
stops. Cancellation during shutdown is not an error; a routine that crashes is logged with its
error, marks the process unhealthy, and makes the supervisor exit non-zero. Nothing hangs: every
stop is bounded, and a routine that overruns its deadline is cancelled with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger(__name__)


class Routine(ABC):
    """Long-running work with a name.

    ``start`` returns once the routine is running (a server is bound, say): the supervisor starts
    the next one only then. ``run`` does the work until ``stop`` asks it to return.
    """

    name: str = "routine"

    def stop_budget(self) -> float | None:
        """Seconds the supervisor grants ``stop`` plus the end of ``run``; None = its default."""
        return None

    async def start(self) -> None:
        """Prepares the routine; raising here aborts the whole start."""

    @abstractmethod
    async def run(self) -> None:
        """The routine's work; returns when stopped. Raising means the routine crashed."""

    @abstractmethod
    async def stop(self) -> None:
        """Asks ``run`` to finish; may wait for the graceful part (draining) itself."""


Handler = Callable[[], Awaitable[None]]


class PeriodicRoutine(Routine):
    """Runs ``handler`` every ``interval`` seconds (after ``initial_delay``).

    An error in the handler is logged with ``error_message`` and the routine carries on; the
    handler's next run is the retry. ``sleep`` is injectable so tests drive a fake clock.
    """

    def __init__(self, name: str, interval: float, handler: Handler, error_message: str,
                 initial_delay: float = 0.0,
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.interval = interval
        self.handler = handler
        self.error_message = error_message
        self.initial_delay = initial_delay
        self._stop = asyncio.Event()
        self._sleep = sleep
        self.errors = 0
        self.runs = 0

    async def _wait(self, seconds: float) -> bool:
        """Waits ``seconds`` or until stopped; True when stopped."""
        if self._sleep is not None:
            await self._sleep(seconds)
            return self._stop.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def run(self) -> None:
        if self.initial_delay and await self._wait(self.initial_delay):
            return
        while not self._stop.is_set():
            self.runs += 1
            try:
                await self.handler()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.error("%s: %s", self.error_message, exc, extra={"routine": self.name})
            if await self._wait(self.interval):
                return

    async def stop(self) -> None:
        self._stop.set()


class Supervisor:
    """Starts routines, waits for a reason to stop, stops them in reverse order.

    ``signals`` are installed on the running loop and restored afterwards; pass ``()`` in tests
    and call :meth:`request_stop` instead. The first signal calls ``on_signal`` (which may start a
    drain) and begins the shutdown; a second one calls ``force_exit``.
    """

    def __init__(self, routines: Sequence[Routine], *,
                 signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                 on_signal: Callable[[signal.Signals], None] | None = None,
                 on_crash: Callable[[Routine, BaseException], None] | None = None,
                 force_exit: Callable[[], None] | None = None,
                 default_stop_timeout: float = 10.0) -> None:
        self.routines = list(routines)
        self.signals = tuple(signals)
        self.on_signal = on_signal
        self.on_crash = on_crash
        self.force_exit = force_exit
        self.default_stop_timeout = default_stop_timeout
        self.crashed: list[tuple[str, BaseException]] = []
        self._stop = asyncio.Event()
        self._signalled = 0
        self._tasks: dict[Routine, asyncio.Task[None]] = {}

    def request_stop(self) -> None:
        self._stop.set()

    def _handle_signal(self, sig: signal.Signals) -> None:
        self._signalled += 1
        if self._signalled == 1:
            log.info("received %s: shutting down", sig.name)
            if self.on_signal is not None:
                self.on_signal(sig)
            self._stop.set()
        else:
            log.warning("received %s again: exiting now", sig.name)
            if self.force_exit is not None:
                self.force_exit()

    def _task_done(self, routine: Routine, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("routine %s crashed: %r", routine.name, exc, exc_info=exc)
            self.crashed.append((routine.name, exc))
            if self.on_crash is not None:
                self.on_crash(routine, exc)
        elif not self._stop.is_set():
            log.error("routine %s ended on its own", routine.name)
            ended = RuntimeError("ended before it was stopped")
            self.crashed.append((routine.name, ended))
            if self.on_crash is not None:
                self.on_crash(routine, ended)
        self._stop.set()

    async def run(self) -> bool:
        """Runs until stopped; returns True when every routine started and stopped cleanly."""
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            loop.add_signal_handler(sig, self._handle_signal, sig)
        started: list[Routine] = []
        try:
            for routine in self.routines:
                try:
                    await routine.start()
                except Exception as exc:
                    log.error("routine %s failed to start: %s", routine.name, exc)
                    self.crashed.append((routine.name, exc))
                    if self.on_crash is not None:
                        self.on_crash(routine, exc)
                    self._stop.set()  # what already runs is now being stopped, not ending on its own
                    break
                started.append(routine)
                task = asyncio.create_task(routine.run(), name=routine.name)
                task.add_done_callback(functools.partial(self._task_done, routine))
                self._tasks[routine] = task
                log.debug("routine %s started", routine.name)
            else:
                await self._stop.wait()
            await self._stop_all(started)
        finally:
            for sig in self.signals:
                loop.remove_signal_handler(sig)
        return not self.crashed

    async def _stop_all(self, started: list[Routine]) -> None:
        for routine in reversed(started):
            budget = routine.stop_budget()
            timeout = budget if budget is not None else self.default_stop_timeout
            t0 = time.monotonic()
            task = self._tasks[routine]
            try:
                await asyncio.wait_for(routine.stop(), timeout)
                remaining = max(0.0, timeout - (time.monotonic() - t0))
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                log.error("routine %s did not stop within %.1fs: cancelling it", routine.name, timeout)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not task.done() or task.cancelled() or task.exception() is not exc:
                    # stop() itself failed (a crash of run() was already recorded by _task_done)
                    log.error("routine %s failed to stop: %r", routine.name, exc, exc_info=exc)
                    self.crashed.append((routine.name, exc))
                    task.cancel()
            log.debug("routine %s stopped in %.3fs", routine.name, time.monotonic() - t0)
