"""ingest-buffer top's pieces: a Service name with several addresses, rates from two readings, the
down panel (the live view itself runs under tmux in tests/lifecycle/test_top.py)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from rich.console import Console

from buffer.top import Target, expand, panel


def test_a_name_with_several_addresses_is_one_buffer_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    def addresses(host: str, port: int, **_: Any) -> list[Any]:
        assert host == "ingest.apps.svc" and port == 8481
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("10.0.0.7", "10.0.0.5")]

    monkeypatch.setattr(socket, "getaddrinfo", addresses)
    assert expand(["http://ingest.apps.svc:8481"]) == ["http://10.0.0.5:8481", "http://10.0.0.7:8481"]
    assert expand(["127.0.0.1:9000", "http://[::1]:8481"]) == ["http://127.0.0.1:9000", "http://[::1]:8481"]


def status(t: float, accepted: int, committed: int, uptime: float) -> dict[str, Any]:
    return {"time_unix": t, "uptime_seconds": uptime, "rows": {"accepted": accepted, "committed": committed}}


def test_rates_come_from_two_readings_and_start_again_after_a_restart() -> None:
    target = Target("http://x")
    readings = iter([status(100.0, 1000, 500, 10.0), status(102.0, 5000, 4500, 12.0), status(103.0, 10, 0, 1.0)])
    target.read = lambda timeout=0.9: Target._take(target, next(readings))  # type: ignore[method-assign]
    target.read()
    assert target.rates == {}
    target.read()
    assert target.rates == {"accepted": 2000.0, "committed": 2000.0}
    target.read()  # uptime went back: counters began again, no rate from across the restart
    assert target.rates == {}
    gap = Target("http://127.0.0.1:1")
    Target._take(gap, status(100.0, 1000, 500, 10.0))
    gap.read(timeout=0.2)  # no answer: the next one starts afresh, rather than averaging over the gap
    Target._take(gap, status(110.0, 9000, 9000, 20.0))
    assert gap.rates == {}


def test_a_status_of_another_shape_is_said_not_raised() -> None:
    console = Console(record=True, width=100)
    for odd in ([1, 2], {"state": "serving"}):
        target = Target("http://x")
        target.status = odd  # type: ignore[assignment]
        console.print(panel(target))
    assert console.export_text().count("cannot show its /status") == 2


def test_a_buffer_that_does_not_answer_is_shown_down() -> None:
    target = Target("http://127.0.0.1:1")
    target.read(timeout=0.5)
    console = Console(record=True, width=100)
    console.print(panel(target))
    text = console.export_text()
    assert "down" in text and "retrying" in text and "http://127.0.0.1:1" in text
