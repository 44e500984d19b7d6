"""The drain state machine on a fake clock: each phase, the deadline, both modes."""

from __future__ import annotations

import asyncio

import pytest

from buffer.lifecycle import Lifecycle, Phase
from tests.fakes import FakeClock


def machine(mode: str, *, timeout: float = 25.0, delay: float = 5.0, linger: float = 2.0) -> tuple[
        FakeClock, Lifecycle, list[Phase]]:
    clock = FakeClock()
    lc = Lifecycle(mode, timeout, delay, linger, clock=clock)
    seen: list[Phase] = []
    lc.subscribe(seen.append)
    return clock, lc, seen


def test_serving_is_ready_only_once_bound_and_until_the_first_signal() -> None:
    _, lc, seen = machine("sidecar")
    assert lc.phase is Phase.STARTING and not lc.ready and lc.accepting
    lc.serve()
    assert lc.ready and lc.remaining() == 25.0, "no drain yet: the whole timeout is left"
    lc.drain("POST /drain")
    assert lc.phase is Phase.DRAINING and not lc.ready and lc.accepting and lc.draining.is_set()
    lc.serve()
    assert lc.phase is Phase.DRAINING, "phases never go back"
    assert seen == [Phase.SERVING, Phase.DRAINING]


def test_sidecar_accepts_through_its_prestop_and_refuses_after_sigterm_plus_linger() -> None:
    clock, lc, seen = machine("sidecar")
    lc.serve()
    lc.drain("POST /drain")
    clock.advance(20)
    lc.poll()
    assert lc.accepting, "a native sidecar's preStop runs beside the app's: keep taking its rows"
    lc.terminate("SIGTERM")
    assert lc.accepting and lc.refuse_at == clock() + 2.0
    clock.advance(1.9)
    lc.poll()
    assert lc.accepting
    clock.advance(0.1)
    lc.poll()
    assert lc.phase is Phase.REFUSING and not lc.accepting and lc.refusing.is_set()
    assert lc.deadline == 1000.0 + 25.0, "the deadline runs from the first signal, not from SIGTERM"
    assert seen == [Phase.SERVING, Phase.DRAINING, Phase.REFUSING]


def test_sidecar_linger_never_outlasts_the_deadline() -> None:
    clock, lc, _ = machine("sidecar", timeout=10, linger=5)
    lc.drain("POST /drain")
    clock.advance(8)
    lc.terminate("SIGTERM")
    assert lc.refuse_at == 1010.0, "2 s left: the linger is cut to the deadline"
    clock.advance(3)
    lc.terminate("SIGTERM")
    lc.poll()
    assert lc.phase is Phase.REFUSING and lc.remaining() == 0.0 and lc.past_deadline()


def test_gateway_refuses_after_the_propagation_delay_whatever_the_signal() -> None:
    for first in ("POST /drain", "SIGTERM"):
        clock, lc, _ = machine("gateway")
        lc.serve()
        (lc.drain if first == "POST /drain" else lc.terminate)(first)
        assert lc.accepting and lc.refuse_at == clock() + 5.0
        lc.terminate("SIGTERM")
        assert lc.refuse_at == clock() + 5.0, "a later signal never moves the refusal"
        clock.advance(5)
        lc.poll()
        assert lc.phase is Phase.REFUSING


def test_a_shutdown_without_a_signal_refuses_at_once_unless_a_refusal_is_under_way() -> None:
    _, lc, _ = machine("sidecar")
    lc.serve()
    lc.shutdown()
    assert lc.phase is Phase.REFUSING and lc.drain_source == "shutdown"
    clock, lc, _ = machine("gateway")
    lc.drain("POST /drain")
    lc.shutdown()
    assert lc.accepting, "the propagation delay already under way stands"
    clock.advance(5)
    lc.poll()
    assert not lc.accepting


def test_drained_is_recorded_once_refusing() -> None:
    clock, lc, _ = machine("sidecar")
    lc.drain("POST /drain")
    clock.advance(1)
    lc.drained()
    assert lc.drained_in is None, "still accepting: more rows may come"
    lc.shutdown()
    clock.advance(2)
    lc.drained()
    clock.advance(5)
    lc.drained()
    assert lc.drained_in == 3.0


def test_faults_and_crashes_end_readiness_for_good() -> None:
    _, lc, _ = machine("gateway")
    lc.serve()
    lc.fault("a flush raised")
    assert not lc.ready and lc.phase is Phase.SERVING and lc.accepting, "unready, still serving"
    _, lc, _ = machine("gateway")
    lc.serve()
    lc.crash("flusher", RuntimeError("boom"))
    assert not lc.ready and lc.crashed == ["flusher: RuntimeError('boom')"] and lc.phase is Phase.DRAINING


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        Lifecycle("daemon", 1.0)


async def test_on_a_loop_the_refusal_comes_by_itself_at_its_time() -> None:
    lc = Lifecycle("sidecar", 5.0, linger=0.05)
    lc.serve()
    lc.terminate("SIGTERM")
    assert lc.accepting
    await asyncio.wait_for(lc.refusing.wait(), 2)
    assert lc.phase is Phase.REFUSING


def test_a_listener_that_raises_is_logged_and_makes_the_buffer_unready(caplog: pytest.LogCaptureFixture) -> None:
    _, lc, seen = machine("gateway", delay=0)

    def broken(phase: Phase) -> None:
        raise RuntimeError("listener bug")

    lc.subscribe(broken)
    lc.serve()
    assert lc.faults and "listener bug" in lc.faults[0] and not lc.ready
    lc.drain("POST /drain")
    assert lc.phase is Phase.REFUSING and seen[-1] is Phase.REFUSING, "the drain goes on, every listener hears it"
    assert any(r.exc_info for r in caplog.records)
