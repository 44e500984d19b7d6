"""The buffer's lifecycle, in one object: the enabled flag, the drain, its deadline.

Phases, in order and never back::

    starting ──▶ serving ──▶ draining ──▶ refusing ──▶ stopped
                (ready)     (not ready,   (writes get
                             accepting)    UNAVAILABLE)

*Serving* is the enabled flag: accepting rows and ready (``/readyz`` 200, gRPC health SERVING). The
first drain signal — ``POST /drain`` from a preStop hook, or SIGTERM — turns it off for good and
sets the one deadline (``--drain-timeout`` from that signal) that bounds everything after it: the
linger, retries, the flush, the gRPC server's grace. When the buffer starts *refusing* depends on
the mode:

* gateway: ``--propagation-delay`` after the first signal, so load balancers stop routing here
  first; then clients go to another replica.
* sidecar: only after SIGTERM plus ``--linger``. A native sidecar's preStop runs beside the
  application's, and its SIGTERM comes after the application exited; an old-style sidecar gets
  SIGTERM together with the application. Either way the application's last rows are accepted.

A shutdown without a signal (embedding, a crashed routine) refuses at once. A linger or delay never
runs past the deadline. Retries stop at the deadline only once the buffer refuses rows: a sidecar
whose application still writes after it (a grace period longer than the drain timeout) keeps
flushing what it takes rather than dropping it. Readers (the gRPC server, the flusher, the admin
routes) look at the phase and the deadline here, and may subscribe to phase changes; nothing calls
back into the wiring.

Faults — a routine that crashed, a background task that raised — make the buffer unready for good
and its exit code non-zero; they are recorded here too, because readiness is decided here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    STARTING = 0
    SERVING = 1
    DRAINING = 2
    REFUSING = 3
    STOPPED = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class Lifecycle:
    def __init__(self, mode: str, drain_timeout: float, propagation_delay: float = 0.0, linger: float = 0.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in ("sidecar", "gateway"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.drain_timeout = drain_timeout
        self.propagation_delay = propagation_delay
        self.linger = linger
        self.clock = clock
        self.phase = Phase.STARTING
        self.drain_source = ""
        self.drain_started: float | None = None
        self.deadline: float | None = None
        self.refuse_at: float | None = None
        self.drained_in: float | None = None  # seconds from the first signal to an empty buffer
        self.crashed: list[str] = []  # routines that crashed: not live
        self.faults: list[str] = []  # internal failures the process survived: not ready
        self.draining = asyncio.Event()
        self.refusing = asyncio.Event()
        self._listeners: list[Callable[[Phase], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    # ----- reading --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING and not self.faults and not self.crashed

    @property
    def accepting(self) -> bool:
        return self.phase < Phase.REFUSING

    @property
    def is_draining(self) -> bool:
        """True from the first drain signal on (accepting or not)."""
        return self.phase >= Phase.DRAINING

    def remaining(self) -> float:
        """Seconds to the deadline; the whole drain timeout while no drain has started."""
        if self.deadline is None:
            return self.drain_timeout
        return max(0.0, self.deadline - self.clock())

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def out_of_time(self, within: float = 0.0) -> bool:
        """True when retrying must stop: no rows come in any more and the deadline is (``within``
        seconds from) now. While rows still come in, there is no giving up on them."""
        return (self.phase >= Phase.REFUSING and self.deadline is not None
                and self.clock() + within >= self.deadline)

    def subscribe(self, listener: Callable[[Phase], None]) -> None:
        """``listener(phase)`` runs on every phase change, on the event loop."""
        self._listeners.append(listener)

    # ----- events ---------------------------------------------------------------------------

    def serve(self) -> None:
        """The listener is bound: the enabled flag turns on (unless a drain already began)."""
        if self.phase is Phase.STARTING:
            self._enter(Phase.SERVING)

    def drain(self, source: str) -> None:
        """A drain signal (``/drain``, a preStop). Idempotent: the first one sets the deadline."""
        if self.drain_started is not None:
            return
        now = self.clock()
        self.drain_source = source
        self.drain_started = now
        self.deadline = now + self.drain_timeout
        log.info("drain started by %s: not ready any more; deadline in %.1fs", source, self.drain_timeout,
                 extra={"mode": self.mode})
        self.draining.set()
        self._enter(Phase.DRAINING)
        if self.mode == "gateway":
            self._refuse_after(self.propagation_delay, "propagation delay")

    def terminate(self, source: str) -> None:
        """SIGTERM or SIGINT: a drain, and in sidecar mode the start of the linger."""
        self.drain(source)
        if self.mode == "sidecar":
            self._refuse_after(self.linger, "linger")

    def shutdown(self, source: str = "shutdown") -> None:
        """A stop with no signal (embedding, a crashed routine): drain and refuse now, unless a
        refusal is already on its way."""
        self.drain(source)
        self._refuse_after(0.0, source)

    def poll(self) -> None:
        """Enters the refusing phase once its time has come (the timer calls this)."""
        if self.refuse_at is not None and self.phase < Phase.REFUSING and self.clock() >= self.refuse_at:
            self.refusing.set()
            self._enter(Phase.REFUSING)
            log.info("refusing new rows (%s)", self.drain_source)

    def drained(self) -> None:
        """The buffer is empty and no row can arrive any more."""
        if self.drained_in is None and self.drain_started is not None and self.phase >= Phase.REFUSING:
            self.drained_in = self.clock() - self.drain_started

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.refusing.set()
        self._enter(Phase.STOPPED)

    def crash(self, routine: str, error: BaseException) -> None:
        """A routine crashed: not live, not ready; the supervisor stops the rest."""
        self.crashed.append(f"{routine}: {error!r}")
        self.drain(f"crash of {routine}")

    def fault(self, what: str) -> None:
        """An internal failure the process survives: not ready from now on, and a non-zero exit."""
        if not self.faults:
            log.error("not ready any more after an internal failure: %s", what)
        self.faults.append(what)

    # ----- internals ------------------------------------------------------------------------

    def _refuse_after(self, delay: float, why: str) -> None:
        if self.refuse_at is not None or self.phase >= Phase.REFUSING:
            return  # the first refusal plan stands: later signals never postpone it
        assert self.deadline is not None
        now = self.clock()
        at = min(now + delay, self.deadline)
        if at > now:
            log.info("accepting rows for %.1fs more (%s)", at - now, why)
        elif delay > 0:
            log.warning("no %s: the drain deadline (--drain-timeout from the first drain signal) has passed", why)
        self.refuse_at = at
        if at <= now:
            self.poll()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test driving the clock): poll() is called by hand
        self._timer = loop.call_later(at - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.poll()
        if self.phase < Phase.REFUSING and self.refuse_at is not None:  # woke a hair early
            self._timer = asyncio.get_running_loop().call_later(
                max(0.001, self.refuse_at - self.clock()), self._on_timer)

    def _enter(self, phase: Phase) -> None:
        if phase <= self.phase:
            return  # phases only move forward
        self.phase = phase
        for listener in list(self._listeners):
            try:
                listener(phase)
            except Exception as exc:  # the drain goes on; the failure is loud and makes the exit non-zero
                log.exception("a listener of the %s phase failed", phase.label)
                self.fault(f"a listener of the {phase.label} phase raised {exc!r}")
