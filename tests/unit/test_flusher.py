"""The flusher with a fake clock and an in-memory sink: triggers, tokens, retries, drain."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from buffer.flusher import Flusher, FlushPolicy
from buffer.ledger import Outcome, Reason
from buffer.lifecycle import Lifecycle
from buffer.ring import Entry, EntryFailed, Ring, State, WhenFull
from buffer.sink import Payload
from tests.fakes import ClickHouseError, FakeClock, Insert, MemorySink

KEY = ("events", "JSONEachRow")
POISON = "CANNOT_PARSE_INPUT_ASSERTION_FAILED"


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


def build(policy: FlushPolicy, sink: Any = None, *, mode: str = "gateway", capacity: int = 10_000_000,
          **flusher: Any) -> tuple[FakeClock, Lifecycle, Ring, Flusher]:
    """A ring and a flusher wired as the app wires them, on a fake clock, with a 30 s drain deadline."""
    clock = FakeClock()
    lifecycle = Lifecycle(mode, 30.0, clock=clock)
    ring = Ring(capacity, 1_000_000, WhenFull.REJECT, clock, batch_rows=policy.max_rows, batch_bytes=policy.max_bytes)
    return clock, lifecycle, ring, Flusher(ring, sink or MemorySink(), policy, lifecycle, clock=clock, **flusher)


async def drain_to_exit(clock: FakeClock, flusher: Flusher, task: asyncio.Task[None], *, past_deadline: bool) -> None:
    """Shuts down as SIGTERM would (refusing at once), optionally with the deadline already passed."""
    flusher.lifecycle.shutdown("test")
    if past_deadline:
        clock.advance(31)
    await flusher.stop()
    await asyncio.wait_for(task, 10)


class Rig:
    def __init__(self, policy: FlushPolicy, sink: MemorySink | None = None, mode: str = "gateway") -> None:
        self.sink = sink or MemorySink()
        self.clock, self.lifecycle, self.ring, self.flusher = build(policy, self.sink, mode=mode, instance="test")
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

    def make(mode: str = "gateway", **kw: object) -> Rig:
        policy = FlushPolicy(**{"max_rows": 100, "max_bytes": 1_000_000, "max_age": 1.0,
                                "initial_backoff": 0.001, "max_backoff": 0.002, **kw})  # type: ignore[arg-type]
        rig = Rig(policy, mode=mode)
        rig.task = asyncio.create_task(rig.flusher.run())
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        assert rig.task is not None
        with contextlib.suppress(Exception):
            await drain_to_exit(rig.clock, rig.flusher, rig.task, past_deadline=True)


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


@pytest.mark.parametrize(("max_rows", "max_bytes", "largest"), [(30, 10_000, 30), (1_000, 160, 20)])
async def test_a_backlog_goes_out_in_batches_capped_by_max_rows_and_max_bytes(
        rig_factory: Callable[..., Rig], max_rows: int, max_bytes: int, largest: int) -> None:
    rig = rig_factory(max_rows=max_rows, max_bytes=max_bytes, concurrency=1)  # 8 bytes a row
    gate = rig.hold_inserts()
    rig.add(rows(10))
    rig.clock.advance(2)
    rig.flusher.wake()
    await until(lambda: not rig.ring.queued_keys())  # the first insert starts and waits at the gate
    for _ in range(12):
        rig.add(rows(5))  # a backlog of 60 rows builds up meanwhile, appended into few entries
    gate.set()
    await until(lambda: rig.sink.rows() == 70)
    sizes = [i.payload.count(b"\n") for i in rig.sink.inserts]
    assert sizes[0] == 10 and max(sizes) == largest and sum(sizes) == 70, sizes


async def test_appended_writes_never_grow_an_entry_past_a_batch() -> None:
    _, _, ring, _ = build(FlushPolicy(max_rows=7, max_bytes=10_000, max_age=1.0))
    ring.offer(rows(5))
    assert ring.try_append(KEY, b'{"a":1}\n' * 2, 2)
    assert not ring.try_append(KEY, b'{"a":1}\n', 1), "7 rows is a whole batch: the next write starts an entry"


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
    await until(lambda: KEY in rig.flusher.scheduler.retrying)
    rig.add(rows(10))
    await asyncio.sleep(0.05)
    assert KEY in rig.flusher.scheduler.retrying and rig.ring.queued(KEY)[0] == 10, "no load on a struggling table"
    rig.sink.failures.clear()
    await until(lambda: rig.sink.rows() == 20)
    assert not rig.flusher.scheduler.retrying


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
    other = build(FlushPolicy(1, 1, 1))[3]
    assert other.instance != rig.flusher.instance


async def test_permanent_error_fails_the_batch_and_moves_on(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=1, max_bytes=8)  # one 8-byte entry per batch
    rig.sink.failures = [ClickHouseError(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED")]
    bad = rig.add(rows(1))
    good = rig.add(rows(1))
    await until(lambda: good.state is State.COMMITTED)
    assert bad.state is State.FAILED and bad.outcome == Outcome(Reason.REJECTED_BY_CLICKHOUSE, POISON), "no store"
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
    rig.lifecycle.drain("test")  # gateway, no propagation delay: refusing at once
    assert rig.ring.closed, "the flusher closes the ring at the refusal point"
    await until(lambda: rig.sink.rows() == 2)


async def test_drain_while_still_accepting_flushes_on_a_short_interval(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(mode="sidecar", max_age=60.0)
    rig.lifecycle.drain("test")  # a sidecar's preStop: not ready, still accepting
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
    sink = MemorySink(failures=[ClickHouseError(210, "NETWORK_ERROR")] * 1000)
    clock, lifecycle, ring, flusher = build(FlushPolicy(100, 10_000, 1.0, initial_backoff=0.001, max_backoff=0.002),
                                            sink)
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(7))
    lifecycle.shutdown("test")
    await until(lambda: len(sink.attempts) >= 3)
    await drain_to_exit(clock, flusher, task, past_deadline=True)
    assert ring.ledger.failed == {Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT): 7}
    assert ring.ledger.lost_rows == 7 and ring.rows == 0


async def test_an_insert_still_running_at_exit_is_in_doubt_not_lost() -> None:
    sink = MemorySink(gate=threading.Event())  # the insert hangs, as one to a stalled server would
    clock, _, ring, flusher = build(FlushPolicy(1, 10_000, 1.0), sink)
    flusher.in_flight_grace = 0.05
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(4))
    await until(lambda: not ring.queued_keys())  # taken and being inserted
    ring.offer(rows(3))  # queued behind it: never sent
    await drain_to_exit(clock, flusher, task, past_deadline=True)
    assert ring.ledger.failed == {Outcome(Reason.IN_DOUBT_AT_EXIT): 4, Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT): 3}
    assert ring.rows == 0
    assert sink.gate is not None
    sink.gate.set()


async def test_backoff_grows_and_is_capped() -> None:
    f = build(FlushPolicy(1, 1, 1, initial_backoff=0.1, max_backoff=1))[3].inserter
    samples = [f.backoff(attempt) for attempt in (1, 2, 3, 10) for _ in range(200)]
    first, second, third, tenth = (samples[i * 200:(i + 1) * 200] for i in range(4))
    assert max(first) <= 0.1 and max(second) <= 0.2 and max(third) <= 0.4 and max(tenth) <= 1.0
    assert max(tenth) > 0.5, "jitter spreads up to the cap"
    assert min(tenth) < 0.5, "full jitter: some retries go early"


async def test_no_answer_retries_on_a_short_cap_server_errors_on_the_long_one() -> None:
    from buffer.errors import classify

    f = build(FlushPolicy(1, 1, 1, initial_backoff=0.5, max_backoff=30))[3].inserter
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
    sink = MemorySink(failures=[ClickHouseError(252, "TOO_MANY_PARTS")])
    clock, _, ring, flusher = build(FlushPolicy(3, 10_000, 1.0, initial_backoff=0.001, max_backoff=0.001), sink,
                                    tracer=provider.get_tracer("test"))
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(3))
    await until(lambda: len(exporter.get_finished_spans()) == 1)
    span = exporter.get_finished_spans()[0]
    assert span.name == "ingest_buffer.flush"
    attrs = dict(span.attributes or {})
    assert attrs["db.collection.name"] == "events" and attrs["ingest_buffer.rows"] == 3
    assert attrs["ingest_buffer.bytes"] == 24 and attrs["ingest_buffer.attempts"] == 2
    await drain_to_exit(clock, flusher, task, past_deadline=False)


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

    def write(self, letters: list[Any]) -> int:
        self.letters.extend(letters)
        return 0


class PoisonRig:
    """A ring and a flusher over a PoisonSink; fill the ring, then drain() flushes everything."""

    def __init__(self) -> None:
        self.sink, self.store = PoisonSink(), ListStore()
        self.clock, _, self.ring, self.flusher = build(FlushPolicy(100_000, 10_000_000, 1.0), self.sink,
                                                       instance="t", dead_letters=self.store)

    async def drain(self) -> None:
        await drain_to_exit(self.clock, self.flusher, asyncio.create_task(self.flusher.run()), past_deadline=False)


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
    assert entries[3].committed_rows == 9 and entries[3].outcome == Outcome(Reason.DEAD_LETTERED, POISON)
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
    assert first.committed_rows == 19 and first.outcome == Outcome(Reason.DEAD_LETTERED, POISON)
    assert rig.ring.ledger.committed_rows == 19 and rig.ring.ledger.accepted_requests == 20


async def test_an_odd_request_in_a_shared_entry_does_not_keep_the_others_from_splitting() -> None:
    rig = PoisonRig()
    pretty = Entry(KEY, b'{"a":\n0}\n', 1)  # one row over two lines, as its writer said (row_count=1)
    rig.ring.offer(pretty)
    assert rig.ring.try_append(KEY, b'{"a":1}\n{"a":"bad"}\n{"a":3}\n', 3)
    await rig.drain()
    assert [letter.payload for letter in rig.store.letters] == [b'{"a":"bad"}\n']
    assert pretty.committed_rows == 3
    assert rig.ring.ledger.failed == {Outcome(Reason.DEAD_LETTERED, POISON): 1}


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
    sink, store = PoisonSink(), ListStore()
    clock, _, ring, flusher = build(FlushPolicy(100, 10_000, 1.0), sink, dead_letters=store)
    ring.offer(Entry(("t", "RowBinary"), b"\x01bad\x02", 5))
    ring.offer(Entry(("t", "RowBinary"), b"\x01ok\x02", 4))
    await drain_to_exit(clock, flusher, asyncio.create_task(flusher.run()), past_deadline=False)
    assert [letter.rows for letter in store.letters] == [5] and sink.rows() == 0 and len(sink.inserts) == 1


class MissingTableSink(MemorySink):
    """Answers UNKNOWN_TABLE for the tables in ``missing``, as ClickHouse does before they are created."""

    def __init__(self, missing: set[str]) -> None:
        super().__init__()
        self.missing = missing

    def insert(self, table: str, fmt: str, payload: Payload, token: str) -> int | None:
        if table in self.missing:
            with self.lock:
                self.attempts.append(Insert(table, fmt, b"", token))
            raise ClickHouseError(60, "UNKNOWN_TABLE")
        return super().insert(table, fmt, payload, token)


async def test_a_table_clickhouse_refuses_as_a_whole_is_held_never_split_and_flows_once_fixed() -> None:
    sink, store = MissingTableSink({"events"}), ListStore()
    policy = FlushPolicy(10, 1_000_000, 1.0, concurrency=1, initial_backoff=0.001, max_backoff=0.005)
    clock, _, ring, flusher = build(policy, sink, dead_letters=store)
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(10))
    await until(lambda: "events" in flusher.held and len(sink.attempts) >= 3)
    held = flusher.held["events"]
    assert held.error == "UNKNOWN_TABLE" and "table 'events' does not exist" in held.advice
    ring.offer(rows(1, ("other", "JSONEachRow")))  # another table flows meanwhile, though the only slot is taken
    clock.advance(2)
    flusher.wake()
    await until(lambda: sink.rows("other") == 1)
    assert sink.rows("events") == 0 and "events" in flusher.held
    sink.missing.clear()  # the operator creates the table
    await until(lambda: sink.rows("events") == 10)
    assert not flusher.held and not store.letters, "never split, never dead-lettered"
    assert len({a.token for a in sink.attempts if a.table == "events"}) == 1, "one token: nothing twice"
    assert ring.ledger.committed_rows == 11 and not ring.ledger.failed
    await drain_to_exit(clock, flusher, task, past_deadline=False)


async def test_a_flush_task_that_raises_fails_its_batch_at_once_and_makes_the_buffer_unready(
        caplog: pytest.LogCaptureFixture) -> None:
    class BrokenTracer:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("tracer bug")

    clock, lifecycle, ring, flusher = build(FlushPolicy(1, 10_000, 1.0), tracer=BrokenTracer())
    lifecycle.serve()
    task = asyncio.create_task(flusher.run())
    e = rows(3)
    e.waiter = asyncio.get_running_loop().create_future()
    ring.offer(e)
    with pytest.raises(EntryFailed, match="internal error"):
        await asyncio.wait_for(e.waiter, 5)  # the COMMITTED writer hears at once, not at exit
    assert ring.ledger.failed == {Outcome(Reason.INTERNAL_ERROR, "RuntimeError"): 3} and ring.rows == 0
    assert not lifecycle.ready and "tracer bug" in lifecycle.faults[0]
    assert any(r.exc_info and "tracer bug" in str(r.exc_info[1]) for r in caplog.records), "logged with traceback"
    await drain_to_exit(clock, flusher, task, past_deadline=False)


async def test_rows_clickhouse_says_it_did_not_write_are_not_counted_as_committed(
        rig_factory: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory(max_rows=10)
    rig.sink.written = lambda insert: insert.payload.count(b"\n") - 1  # one row of each insert skipped
    first, last = rows(6), rows(4)
    last.waiter = asyncio.get_running_loop().create_future()
    rig.add(first)
    rig.add(last)
    await until(lambda: rig.ring.ledger.committed_rows == 9)
    assert rig.ring.ledger.failed == {Outcome(Reason.NOT_WRITTEN): 1} and rig.ring.ledger.lost_rows == 1
    with pytest.raises(EntryFailed, match="1 of 4 rows were in an insert ClickHouse acknowledged but reported fewer"):
        await last.waiter  # the shortfall is counted against the batch's last rows, and their writer hears it
    assert first.state is State.COMMITTED
    assert any("ClickHouse wrote 9 of the 10 rows" in r.getMessage() for r in caplog.records)


async def test_a_deduplicated_insert_reports_no_rows_and_is_still_committed(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10)
    rig.sink.written = lambda insert: 0  # a replay under a token ClickHouse has seen
    rig.add(rows(10))
    await until(lambda: rig.ring.ledger.committed_rows == 10)
    assert not rig.ring.ledger.failed


async def test_cancelled_while_waiting_for_inserts_at_exit_it_still_accounts_for_every_row() -> None:
    sink = MemorySink(gate=threading.Event())  # ClickHouse black-holed: the insert hangs
    clock, lifecycle, ring, flusher = build(FlushPolicy(1, 10_000, 1.0), sink)
    flusher.in_flight_grace = 30.0
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(5))
    await until(lambda: not ring.queued_keys())
    lifecycle.shutdown("test")
    clock.advance(31)
    await flusher.stop()
    await asyncio.sleep(0.05)  # now waiting for the hung insert, as when the supervisor's budget runs out
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert ring.ledger.failed == {Outcome(Reason.IN_DOUBT_AT_EXIT): 5} and ring.ledger.held_rows == 0
    assert ring.ledger.exit_code(crashed=False) == 3
    assert sink.gate is not None
    sink.gate.set()


async def test_a_sidecar_past_its_deadline_but_still_accepting_keeps_retrying_instead_of_dropping() -> None:
    sink = MemorySink(failures=[ClickHouseError(252, "TOO_MANY_PARTS")] * 3)
    policy = FlushPolicy(10, 10_000, 1.0, initial_backoff=0.001, max_backoff=0.002)
    clock, lifecycle, ring, flusher = build(policy, sink, mode="sidecar")
    task = asyncio.create_task(flusher.run())
    lifecycle.drain("POST /drain")
    clock.advance(40)  # the app outlives the drain timeout (a grace period longer than it)
    assert lifecycle.accepting and lifecycle.past_deadline()
    assert flusher.scheduler.next_timeout(clock(), [], lifecycle.deadline) is None, "a past deadline: no spin"
    ring.offer(rows(10))
    await until(lambda: sink.rows() == 10)
    assert not ring.ledger.failed, "rows taken after the deadline are still flushed, not given up"
    await drain_to_exit(clock, flusher, task, past_deadline=False)


async def test_a_barrier_waiting_on_a_held_table_leaves_other_tables_batching() -> None:
    sink = MissingTableSink({"events"})
    policy = FlushPolicy(100, 1_000_000, 1.0, concurrency=2, initial_backoff=0.001, max_backoff=0.005)
    clock, _, ring, flusher = build(policy, sink)
    task = asyncio.create_task(flusher.run())
    ring.offer(rows(3))
    barrier = ring.barrier()
    flusher.wake()
    await until(lambda: "events" in flusher.held)
    for _ in range(20):
        ring.offer(rows(1, ("other", "JSONEachRow")))  # a trickle, each after the barrier
        await asyncio.sleep(0.002)
    assert sink.rows("other") == 0, "young rows the barrier does not cover wait for their age"
    clock.advance(1.0)
    flusher.wake()
    await until(lambda: sink.rows("other") == 20)
    assert len([i for i in sink.inserts if i.table == "other"]) == 1, "one insert, not one per request"
    assert not barrier.done.done()
    sink.missing.clear()
    await asyncio.wait_for(barrier.done, 5)
    await drain_to_exit(clock, flusher, task, past_deadline=False)


async def test_a_table_held_then_refusing_poison_rows_is_no_longer_reported_held() -> None:
    class Sink(MissingTableSink):
        def insert(self, table: str, fmt: str, payload: Payload, token: str) -> int | None:
            data = payload if isinstance(payload, bytes) else b"".join(payload)
            if table not in self.missing and b"bad" in data:
                raise ClickHouseError(27, POISON)
            return super().insert(table, fmt, payload, token)

    sink, store = Sink({"events"}), ListStore()
    policy = FlushPolicy(10, 1_000_000, 1.0, initial_backoff=0.001, max_backoff=0.005)
    clock, _, ring, flusher = build(policy, sink, dead_letters=store)
    task = asyncio.create_task(flusher.run())
    ring.offer(Entry(KEY, b'{"a":1}\n{"a":"bad"}\n' + b'{"a":2}\n' * 8, 10))
    await until(lambda: "events" in flusher.held)
    sink.missing.clear()  # created; one row of the batch is bad
    await until(lambda: ring.rows == 0)
    assert not flusher.held and len(store.letters) == 1 and sink.rows("events") == 9
    await drain_to_exit(clock, flusher, task, past_deadline=False)


async def test_with_one_slot_a_backlogged_table_takes_turns_with_the_others(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_rows=10, concurrency=1)
    gate = rig.hold_inserts()
    await rig.add_taken(rows(10))  # the only slot is busy
    for _ in range(10):
        rig.add(rows(10))  # a backlog of ten full batches
    rig.add(rows(1, ("other", "JSONEachRow")))
    rig.clock.advance(2)
    gate.set()
    await until(lambda: rig.sink.rows() == 111)
    order = [i.table for i in rig.sink.inserts]
    assert order.index("other") <= 2, f"served in turn, not after the whole backlog: {order}"
