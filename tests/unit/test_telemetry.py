"""Metrics are read on the event loop; an exporter's thread only ever sees a finished snapshot."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import generate_latest

from buffer.telemetry import Telemetry


def test_collection_from_another_thread_reads_the_snapshot_never_the_live_state() -> None:
    t = Telemetry()
    state = {"a": 1}
    readers: list[int] = []

    def reading() -> list[tuple[float, dict[str, str]]]:
        readers.append(threading.get_ident())
        return [(n, {"key": k}) for k, n in state.items()]  # iterating live state: unsafe off its thread

    t.observe("ingest_buffer_test_things", "things", reading)
    t.snapshot()
    state["b"] = 2  # changes after the snapshot are not seen until the next one
    texts: list[str] = []
    exporter = threading.Thread(target=lambda: texts.append(generate_latest(t.registry).decode()))
    exporter.start()
    exporter.join(10)
    assert 'ingest_buffer_test_things_total{key="a"} 1.0' in texts[0]
    assert 'key="b"' not in texts[0]
    assert readers == [threading.get_ident()], "the reading ran once, on this (the loop's) thread"
    assert 'key="b"' in t.prometheus_text().decode(), "a scrape on the loop takes a fresh snapshot"


def test_a_reading_that_fails_is_not_swallowed() -> None:
    t = Telemetry()

    def broken() -> list[tuple[float, dict[str, str]]]:
        raise RuntimeError("dictionary changed size during iteration")

    t.observe("ingest_buffer_test_broken", "broken", broken)
    with pytest.raises(RuntimeError):
        t.snapshot()
