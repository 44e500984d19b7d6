"""The flusher with a fake clock and an in-memory sink: triggers, tokens, retries, drain."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from buffer.flusher import Flusher, FlushPolicy
from buffer.ring import Entry, EntryFailed, Ring, State, WhenFull
from buffer.sink import Payload
from tests.fakes import ClickHouseError, FakeClock, Insert, MemorySink

KEY = ("events", "JSONEachRow")


def rows(n: int, key: tuple[str, str] = KEY) -> Entry:
    return Entry(key, b'{"a":1}\n' * n, n)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls with a deadline (the flusher's insert runs in a thread)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Rig:
    def __init__(self, policy: FlushPolicy, sink: MemorySink | None = None, capacity: int = 10_000_000) -> None:
        self.clock = FakeClock()
        self.ring = Ring(capacity, 1_000_000, WhenFull.REJECT, self.clock)
        self.sink = sink or MemorySink()
        self.flusher = Flusher(self.ring, self.sink, policy, clock=self.clock, instance="test")
        self.task: asyncio.Task[None] | None = None

    def add(self, entry: Entry) -> Entry:
        self.ring.offer(entry)
        return entry

    def hold_inserts(self) -> threading.Event:
        """Inserts wait (in their threads) until the returned event is set."""
        self.sink.gate = threading.Event()
        return self.sink.gate

    async def add_taken(self, entry: Entry) -> None:
        """Adds the entry and waits until the flusher has taken it (its insert is under way)."""
        self.add(entry)
        await until(lambda: not self.ring.queued_keys())


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**kw: object) -> Rig:
        policy = FlushPolicy(**{"max_rows": 100, "max_bytes": 1_000_000, "max_age": 1.0,
                                "initial_backoff": 0.001, "max_backoff": 0.002, **kw})  # type: ignore[arg-type]
        rig = Rig(policy)
        rig.task = asyncio.create_task(rig.flusher.run())
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.flusher.drain(rig.clock() + 0.0)
        await rig.flusher.stop()
        assert rig.task is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rig.task, 5)


async def test_waits_for_age_then_flushes(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.add(rows(3))
    await asyncio.sleep(0.05)
    assert rig.sink.inserts == [], "young, small batch waits"
    rig.clock.advance(1.0)
    rig.flusher.wake()
    await until(lambda: len(rig.sink.inserts) == 1)
    assert rig.sink.inserts[0].payload == b'{"a":1}\n' * 3
    assert rig.ring.rows == 0


async def test_flushes_at_max_rows_without_waiting(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10)
    for _ in range(5):
        rig.add(rows(2))
    await until(lambda: rig.sink.rows() == 10)
    assert len(rig.sink.inserts) == 1, "one insert of the whole batch"


async def test_a_backlog_goes_out_in_batches_bounded_by_bytes_not_rows(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, max_bytes=400)  # 8 bytes a row: 50 rows per insert at most
    gate = rig.hold_inserts()
    await rig.add_taken(rows(10))  # due: the first insert starts and waits at the gate
    for _ in range(12):
        rig.add(rows(10))  # a backlog of 120 rows builds up meanwhile
    gate.set()
    await until(lambda: rig.sink.rows() == 130)
    sizes = [i.payload.count(b"\n") for i in rig.sink.inserts]
    assert sizes[0] == 10 and max(sizes) == 50 and len(sizes) == 4, sizes


async def test_full_batches_of_one_table_go_out_side_by_side(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, concurrency=2)
    gate = rig.hold_inserts()
    await rig.add_taken(rows(10))  # the first insert waits at the gate
    await rig.add_taken(rows(10))  # a second full batch starts beside it
    rig.add(rows(10))
    await asyncio.sleep(0.05)
    assert rig.ring.queued(KEY)[0] == 10, "no third insert: both slots are busy"
    gate.set()
    await until(lambda: rig.sink.rows() == 30)
    assert len(rig.sink.inserts) == 3 and len({i.token for i in rig.sink.inserts}) == 3


async def test_a_partial_batch_waits_for_its_tables_insert_and_grows(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, concurrency=2)
    gate = rig.hold_inserts()
    await rig.add_taken(rows(10))
    rig.add(rows(3))
    barrier = rig.ring.barrier()
    rig.flusher.wake()
    rig.clock.advance(5)  # old, and a barrier waits: still not worth a second, tiny insert yet
    await asyncio.sleep(0.05)
    rig.add(rows(4))
    assert rig.ring.queued(KEY)[0] == 7
    gate.set()
    await asyncio.wait_for(barrier.done, 5)
    assert [i.payload.count(b"\n") for i in rig.sink.inserts] == [10, 7]


async def test_a_table_with_a_backlog_never_holds_up_another(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, concurrency=2)
    gate = rig.hold_inserts()
    await rig.add_taken(rows(10))
    await rig.add_taken(rows(10))  # both slots: the backlog of "events"
    rig.add(rows(1, ("other", "JSONEachRow")))
    rig.clock.advance(2)  # old enough to flush
    rig.flusher.wake()
    await until(lambda: not rig.ring.queued_keys())  # it starts anyway: a table may always have one insert
    gate.set()
    await until(lambda: rig.sink.rows() == 21)


async def test_no_second_batch_beside_an_insert_being_retried(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, concurrency=2, initial_backoff=0.005, max_backoff=0.01)
    rig.sink.failures = [ClickHouseError(252, "TOO_MANY_PARTS")] * 60
    rig.add(rows(10))
    await until(lambda: KEY in rig.flusher._retrying)
    rig.add(rows(10))
    await asyncio.sleep(0.05)
    assert KEY in rig.flusher._retrying and rig.ring.queued(KEY)[0] == 10, "no extra load on a struggling table"
    rig.sink.failures.clear()
    await until(lambda: rig.sink.rows() == 20)
    assert not rig.flusher._retrying


async def test_with_every_slot_taken_the_loop_waits_for_a_flush_not_a_timer() -> None:
    clock = FakeClock()
    ring = Ring(10_000, 10_000, WhenFull.REJECT, clock)
    flusher = Flusher(ring, MemorySink(), FlushPolicy(10, 10_000, 1.0, concurrency=1), clock=clock)
    ring.offer(rows(1))
    ring.offer(rows(1, ("other", "CSV")))
    clock.advance(5)
    assert flusher._next_timeout(clock()) == 0.0, "both are due"
    flusher._busy[KEY] += 1  # as if the first key's insert were running
    assert flusher._next_timeout(clock()) is None, "no slot: a timeout would only spin"


async def test_flushes_at_max_bytes(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_bytes=80)
    for _ in range(10):
        rig.add(rows(1))  # 8 bytes each
    await until(lambda: rig.sink.rows() == 10)


async def test_batches_per_table_and_format(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.add(rows(1, ("a", "JSONEachRow")))
    rig.add(rows(1, ("a", "CSV")))
    rig.add(rows(1, ("b", "JSONEachRow")))
    rig.add(rows(1, ("a", "JSONEachRow")))
    rig.clock.advance(2)
    rig.flusher.wake()
    await until(lambda: len(rig.sink.inserts) == 3)
    got = sorted((i.table, i.fmt, i.payload.count(b"\n")) for i in rig.sink.inserts)
    assert got == [("a", "CSV", 1), ("a", "JSONEachRow", 2), ("b", "JSONEachRow", 1)]


async def test_retry_reuses_the_deduplication_token(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    rig.sink.failures = [ClickHouseError(252, "TOO_MANY_PARTS"), TimeoutError("read timed out")]
    rig.add(rows(1))
    await until(lambda: len(rig.sink.inserts) == 1)
    tokens = {a.token for a in rig.sink.attempts}
    assert len(rig.sink.attempts) == 3 and len(tokens) == 1
    assert rig.flusher.stats.retries == 2
    assert rig.flusher.stats.errors == {"TOO_MANY_PARTS": 1, "NETWORK": 1}


async def test_tokens_differ_between_batches_and_instances(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    rig.add(rows(1))
    rig.add(rows(1))
    await until(lambda: len(rig.sink.inserts) == 2)
    t1, t2 = (i.token for i in rig.sink.inserts)
    assert t1 != t2 and t1.startswith("test-")
    other = Flusher(Ring(10, 10, WhenFull.REJECT), MemorySink(), FlushPolicy(1, 1, 1))
    assert other.instance != rig.flusher.instance


async def test_permanent_error_fails_the_batch_and_moves_on(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    rig.sink.failures = [ClickHouseError(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED")]
    bad = rig.add(rows(1))
    good = rig.add(rows(1))
    await until(lambda: good.state is State.COMMITTED)
    assert bad.state is State.FAILED and "CANNOT_PARSE_INPUT_ASSERTION_FAILED" in bad.reason
    assert len(rig.sink.attempts) == 2, "a permanent error is not retried"


async def test_unknown_code_is_retried_a_bounded_number_of_times(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    rig.sink.failures = [ClickHouseError(12345, "NEW_ERROR")] * 10
    e = rig.add(rows(1))
    await until(lambda: e.state is State.FAILED)
    assert len(rig.sink.attempts) == 5


async def test_drain_flushes_young_batches_at_once_once_refusing(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.add(rows(2))
    rig.ring.close()
    rig.flusher.drain(rig.clock() + 30)
    await until(lambda: rig.sink.rows() == 2)


async def test_drain_while_still_accepting_flushes_on_a_short_interval(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_age=60.0)
    rig.flusher.drain(rig.clock() + 30)
    rig.add(rows(2))
    await asyncio.sleep(0.05)
    assert rig.sink.rows() == 0, "rows arriving while a sidecar drains are still batched"
    rig.clock.advance(0.1)
    rig.flusher.wake()
    await until(lambda: rig.sink.rows() == 2)


async def test_barrier_flushes_at_once(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.add(rows(2))
    barrier = rig.ring.barrier()
    rig.flusher.wake()
    await asyncio.wait_for(barrier.done, 5)
    assert barrier.outcome() == (2, 0)


async def test_stop_after_deadline_reports_rows_not_flushed() -> None:
    clock = FakeClock()
    ring = Ring(10_000, 10_000, WhenFull.REJECT, clock)
    sink = MemorySink(failures=[ClickHouseError(210, "NETWORK_ERROR")] * 1000)
    flusher = Flusher(ring, sink, FlushPolicy(100, 10_000, 1.0, initial_backoff=0.001, max_backoff=0.002),
                      clock=clock)
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(7))
    ring.close()
    flusher.drain(clock() + 10)
    await until(lambda: len(sink.attempts) >= 3)
    clock.advance(11)
    await flusher.stop()
    await asyncio.wait_for(task, 5)
    assert flusher.not_flushed_rows == 7
    assert ring.counters.failed_rows["not_flushed_before_exit"] == 7
    assert ring.rows == 0


async def test_an_insert_still_running_at_exit_is_in_doubt_not_lost() -> None:
    clock = FakeClock()
    ring = Ring(10_000, 10_000, WhenFull.REJECT, clock)
    sink = MemorySink(gate=threading.Event())  # the insert hangs, as one to a stalled server would
    flusher = Flusher(ring, sink, FlushPolicy(1, 10_000, 1.0), clock=clock)
    flusher.in_flight_grace = 0.05
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(4))
    await until(lambda: not ring.queued_keys())  # taken and being inserted
    ring.offer(rows(3))  # queued behind it: never sent
    ring.close()
    flusher.drain(clock() + 1)
    clock.advance(2)
    await flusher.stop()
    await asyncio.wait_for(task, 5)
    assert flusher.in_doubt_rows == 4 and flusher.not_flushed_rows == 3
    assert dict(ring.counters.failed_rows) == {"in_doubt_at_exit": 4, "not_flushed_before_exit": 3}
    assert ring.rows == 0
    assert sink.gate is not None
    sink.gate.set()


async def test_backoff_grows_and_is_capped() -> None:
    f = Flusher(Ring(1, 1, WhenFull.REJECT), MemorySink(), FlushPolicy(1, 1, 1, initial_backoff=0.1, max_backoff=1))
    samples = [f.backoff(attempt) for attempt in (1, 2, 3, 10) for _ in range(200)]
    first, second, third, tenth = (samples[i * 200:(i + 1) * 200] for i in range(4))
    assert max(first) <= 0.1 and max(second) <= 0.2 and max(third) <= 0.4 and max(tenth) <= 1.0
    assert max(tenth) > 0.5, "jitter spreads up to the cap"
    assert min(tenth) < 0.5, "full jitter: some retries go early"


async def test_no_answer_retries_on_a_short_cap_server_errors_on_the_long_one() -> None:
    from buffer.errors import classify

    f = Flusher(Ring(1, 1, WhenFull.REJECT), MemorySink(), FlushPolicy(1, 1, 1, initial_backoff=0.5, max_backoff=30))
    refused = classify(ConnectionRefusedError("refused"))
    busy = classify(ClickHouseError(252, "TOO_MANY_PARTS"))
    assert max(f.backoff(10, refused) for _ in range(300)) <= 1.0
    assert max(f.backoff(10, busy) for _ in range(300)) > 5.0


async def test_inserts_run_off_the_event_loop(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    gate = rig.hold_inserts()
    rig.add(rows(1))
    # While the insert is blocked in its thread, the loop keeps running and accepting.
    await asyncio.sleep(0.05)
    rig.add(rows(1))
    assert rig.ring.rows == 2
    gate.set()
    await until(lambda: rig.sink.rows() == 2)


async def test_each_flush_is_a_span_with_table_rows_bytes_and_attempts() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = FakeClock()
    ring = Ring(10_000, 10_000, WhenFull.REJECT, clock)
    sink = MemorySink(failures=[ClickHouseError(252, "TOO_MANY_PARTS")])
    flusher = Flusher(ring, sink, FlushPolicy(3, 10_000, 1.0, initial_backoff=0.001, max_backoff=0.001),
                      clock=clock, tracer=provider.get_tracer("test"))
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(3))
    await until(lambda: len(exporter.get_finished_spans()) == 1)
    span = exporter.get_finished_spans()[0]
    assert span.name == "ingest_buffer.flush"
    attrs = dict(span.attributes or {})
    assert attrs["db.collection.name"] == "events" and attrs["ingest_buffer.rows"] == 3
    assert attrs["ingest_buffer.bytes"] == 24 and attrs["ingest_buffer.attempts"] == 2
    ring.close()
    flusher.drain(clock())
    await flusher.stop()
    await asyncio.wait_for(task, 5)


class PoisonSink(MemorySink):
    """Refuses, like ClickHouse's parser, any payload holding a row with b"bad" in it."""

    def insert(self, table: str, fmt: str, payload: Payload, token: str) -> None:
        payload = payload if isinstance(payload, bytes) else b"".join(payload)
        if b"bad" in payload:
            with self.lock:
                self.attempts.append(Insert(table, fmt, payload, token))
            raise ClickHouseError(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED")
        super().insert(table, fmt, payload, token)


class ListStore:
    def __init__(self) -> None:
        self.letters: list[Any] = []

    def write(self, letters: list[Any]) -> None:
        self.letters.extend(letters)


class PoisonRig:
    """A ring and a flusher over a PoisonSink; fill the ring, then drain() flushes everything."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.ring = Ring(10_000_000, 1_000_000, WhenFull.REJECT, self.clock)
        self.sink, self.store = PoisonSink(), ListStore()
        self.flusher = Flusher(self.ring, self.sink, FlushPolicy(100_000, 10_000_000, 1.0), clock=self.clock,
                               instance="t", dead_letters=self.store)

    async def drain(self) -> None:
        task = asyncio.create_task(self.flusher.run())
        self.ring.close()
        self.flusher.drain(self.clock() + 60)
        await self.flusher.stop()
        await asyncio.wait_for(task, 10)


async def run_poison(payloads: list[bytes], *, waiters: bool = False) -> tuple[PoisonSink, ListStore, list[Entry]]:
    rig = PoisonRig()
    entries = []
    for p in payloads:
        e = Entry(KEY, p, p.count(b"\n"))
        if waiters:
            e.waiter = asyncio.get_running_loop().create_future()
        rig.ring.offer(e)
        entries.append(e)
    await rig.drain()
    return rig.sink, rig.store, entries


async def test_poison_rows_are_isolated_good_rows_land_bad_rows_dead_lettered() -> None:
    good = [b'{"a":%d}\n' % i for i in range(100)]
    payloads = [b"".join(good[i:i + 10]) for i in range(0, 100, 10)]
    payloads[3] = payloads[3].replace(b'{"a":33}', b'{"a":"bad"}')
    payloads[7] = payloads[7].replace(b'{"a":70}', b'{"a":"bad70"}')
    sink, store, entries = await run_poison(payloads)
    assert sink.rows() == 98
    assert sorted(letter.payload for letter in store.letters) == [b'{"a":"bad"}\n', b'{"a":"bad70"}\n']
    assert all(letter.code == 27 and letter.rows == 1 for letter in store.letters)
    assert entries[3].committed_rows == 9 and entries[3].reason.startswith("dead_lettered:")
    assert entries[0].state is State.COMMITTED
    # Bisection, not one insert per row: far fewer attempts than rows.
    assert len(sink.attempts) < 40


async def test_appended_writes_go_out_in_order_and_poison_rows_among_them_are_still_isolated() -> None:
    rig = PoisonRig()
    first = Entry(KEY, b'{"a":0}\n', 1)
    rig.ring.offer(first)
    for i in range(1, 20):
        row = b'{"a":"bad"}\n' if i == 7 else b'{"a":%d}\n' % i
        assert rig.ring.try_append(KEY, row, 1)
    assert rig.ring.outstanding == 1, "twenty writes, one entry"
    await rig.drain()
    landed = b"".join(i.payload for i in rig.sink.inserts)
    assert landed.count(b"\n") == 19 and [letter.payload for letter in rig.store.letters] == [b'{"a":"bad"}\n']
    assert first.committed_rows == 19 and first.reason.startswith("dead_lettered:")
    assert rig.ring.counters.committed_rows == 19 and rig.ring.counters.accepted_requests == 20


async def test_an_odd_request_in_a_shared_entry_does_not_keep_the_others_from_splitting() -> None:
    rig = PoisonRig()
    pretty = Entry(KEY, b'{"a":\n0}\n', 1)  # one row over two lines, as its writer said (row_count=1)
    rig.ring.offer(pretty)
    assert rig.ring.try_append(KEY, b'{"a":1}\n{"a":"bad"}\n{"a":3}\n', 3)
    await rig.drain()
    assert [letter.payload for letter in rig.store.letters] == [b'{"a":"bad"}\n']
    assert pretty.committed_rows == 3
    assert rig.ring.counters.failed_rows == {"dead_lettered:CANNOT_PARSE_INPUT_ASSERTION_FAILED": 1}


async def test_isolation_tokens_are_deterministic() -> None:
    payloads = [b'{"a":1}\n{"a":"bad"}\n', b'{"a":2}\n']
    first, _, _ = await run_poison(payloads)
    second, _, _ = await run_poison(payloads)
    assert [a.token for a in first.attempts] == [a.token for a in second.attempts]
    assert len({a.token for a in first.attempts}) == len(first.attempts), "each sub-insert has its own token"


async def test_committed_waiter_hears_its_rows_were_dead_lettered_and_why() -> None:
    _, _, entries = await run_poison([b'{"a":"bad"}\n{"a":1}\n', b'{"a":2}\n'], waiters=True)
    assert entries[0].waiter is not None and entries[1].waiter is not None
    with pytest.raises(EntryFailed, match=r"1 of 2 rows were refused by ClickHouse and written to the dead-letter "
                                          r"store \(CANNOT_PARSE_INPUT_ASSERTION_FAILED\): Code: 27"):
        await entries[0].waiter
    await entries[1].waiter


async def test_binary_entries_are_dead_lettered_whole() -> None:
    clock = FakeClock()
    ring = Ring(10_000, 10_000, WhenFull.REJECT, clock)
    sink, store = PoisonSink(), ListStore()
    flusher = Flusher(ring, sink, FlushPolicy(100, 10_000, 1.0), clock=clock, dead_letters=store)
    ring.offer(Entry(("t", "RowBinary"), b"\x01bad\x02", 5))
    ring.offer(Entry(("t", "RowBinary"), b"\x01ok\x02", 4))
    task = asyncio.create_task(flusher.run())
    ring.close()
    flusher.drain(clock() + 60)
    await flusher.stop()
    await asyncio.wait_for(task, 10)
    assert [letter.rows for letter in store.letters] == [5] and sink.rows() == 0 and len(sink.inserts) == 1
