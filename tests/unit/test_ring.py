"""The ring buffer: bounds, full policies, accounting, barriers — examples and properties."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from buffer.ledger import Outcome, Reason
from buffer.ring import BufferClosed, BufferFull, Entry, EntryFailed, Ring, State, WhenFull
from tests.fakes import FakeClock

KEY = ("events", "JSONEachRow")
DROPPED = Outcome(Reason.DROPPED_OLDEST)


def entry(size: int = 10, rows: int = 1, key: tuple[str, str] = KEY) -> Entry:
    return Entry(key, b"x" * size, rows)


async def test_offer_take_release_accounts_every_byte() -> None:
    ring = Ring(100, 10, WhenFull.REJECT)
    for _ in range(3):
        ring.offer(entry(20, 2))
    assert (ring.bytes, ring.rows) == (60, 6)
    batch = ring.take(KEY, max_rows=4, max_bytes=1000)
    assert [e.seq for e in batch] == [1, 2]
    assert all(e.state is State.IN_FLIGHT for e in batch)
    assert ring.bytes == 60, "in-flight bytes still count against the capacity"
    ring.release(batch)
    assert (ring.bytes, ring.rows) == (20, 2)
    assert ring.ledger.committed_rows == 4


async def test_reject_raises_with_retry_hint_and_keeps_contents() -> None:
    ring = Ring(50, 100, WhenFull.REJECT)
    ring.offer(entry(40))
    with pytest.raises(BufferFull) as info:
        ring.offer(entry(20))
    assert info.value.retry_after > 0
    assert "50 bytes" in str(info.value)
    assert ring.bytes == 40 and ring.ledger.accepted_requests == 1


async def test_row_bound_applies_as_well_as_bytes() -> None:
    ring = Ring(10_000, 5, WhenFull.REJECT)
    ring.offer(entry(10, 4))
    with pytest.raises(BufferFull):
        ring.offer(entry(10, 2))


async def test_drop_oldest_evicts_pending_and_counts_intentional_drops() -> None:
    ring = Ring(30, 100, WhenFull.DROP_OLDEST)
    first, second = entry(10), entry(10, key=("other", "CSV"))
    first.waiter = asyncio.get_running_loop().create_future()
    ring.offer(first)
    ring.offer(second)
    ring.offer(entry(10))
    ring.offer(entry(15))  # needs 15 bytes: the two oldest go
    assert first.state is State.FAILED and second.state is State.FAILED
    assert ring.ledger.failed == {DROPPED: 2}
    assert ring.bytes == 25
    with pytest.raises(EntryFailed, match=r"dropped to make room for newer rows \(when_full=drop_oldest\)"):
        await first.waiter


async def test_drop_oldest_never_drops_in_flight_rows() -> None:
    ring = Ring(20, 100, WhenFull.DROP_OLDEST)
    ring.offer(entry(20))
    batch = ring.take(KEY, 10, 100)
    with pytest.raises(BufferFull):
        ring.offer(entry(10))
    assert batch[0].state is State.IN_FLIGHT


async def test_try_admit_takes_only_what_fits_now_and_never_drops_or_jumps_the_queue() -> None:
    ring = Ring(30, 100, WhenFull.DROP_OLDEST)
    first = entry(20)
    assert ring.try_admit(first) and first.seq == 1
    assert not ring.try_admit(entry(20)), "no room: the caller decides (offer / put)"
    assert first.state is State.PENDING, "nothing dropped"
    block = Ring(30, 100, WhenFull.BLOCK)
    block.offer(entry(25))
    waiting = asyncio.create_task(block.put(entry(20), timeout=5))
    await asyncio.sleep(0)
    assert block.blocked_writers == 1
    assert not block.try_admit(entry(5)), "it would fit, but a writer waiting for room comes first"
    block.release(block.take(KEY, 1, 1000))
    await asyncio.wait_for(waiting, 1)
    block.close()
    assert not block.try_admit(entry(1)), "closed"


async def test_appended_writes_join_the_newest_entry_and_are_counted_like_any_other() -> None:
    ring = Ring(1000, 100, WhenFull.REJECT, coalesce_bytes=50)
    assert not ring.try_append(KEY, b"aa", 1), "nothing queued to join"
    first = entry(20, 2)
    ring.offer(first)
    assert ring.try_append(KEY, b"b" * 10, 1) and ring.try_append(KEY, b"c" * 10, 1)
    assert first.parts() == [(b"x" * 20, 2), (b"b" * 10, 1), (b"c" * 10, 1)] and (first.rows, first.size) == (4, 40)
    assert (ring.bytes, ring.rows, ring.outstanding) == (40, 4, 1)
    assert ring.queued(KEY)[:2] == (4, 40)
    assert ring.ledger.accepted_requests == 3 and ring.ledger.accepted_rows == 4
    assert not ring.try_append(KEY, b"d" * 11, 1), "the entry would pass coalesce_bytes"
    assert not ring.try_append(("other", "CSV"), b"d", 1), "only into the same table and format"
    batch = ring.take(KEY, 100, 1000)
    assert batch == [first] and not ring.try_append(KEY, b"e", 1), "an entry being inserted never grows"
    ring.release(batch)
    assert ring.ledger.committed_rows == 4 and first.extra is None and ring.bytes == 0


async def test_appending_never_joins_a_waited_on_or_barrier_covered_entry_or_passes_the_bounds() -> None:
    ring = Ring(100, 10, WhenFull.REJECT)
    waited = entry(10)
    waited.waiter = asyncio.get_running_loop().create_future()
    ring.offer(waited)
    assert not ring.try_append(KEY, b"a", 1), "a COMMITTED writer's entry holds its own rows only"
    plain = entry(10)
    ring.offer(plain)
    barrier = ring.barrier()
    assert not ring.try_append(KEY, b"a", 1), "the barrier's outcome counts what it covered, no more"
    ring.release(ring.take(KEY, 10, 1000))
    await asyncio.wait_for(barrier.done, 1)
    ring.offer(entry(10))
    assert not ring.try_append(KEY, b"a" * 91, 1), "no room"
    assert not ring.try_append(KEY, b"a", 10), "no room for the rows"
    ring.close()
    assert not ring.try_append(KEY, b"a", 1), "closed"
    assert plain.state is State.COMMITTED


async def test_settle_counts_every_reason_of_an_entry_and_names_the_main_one() -> None:
    ring = Ring(1000, 100, WhenFull.REJECT)
    e = entry(10, 10)
    ring.offer(e)
    bad, late = Outcome(Reason.DEAD_LETTERED, "BAD"), Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT)
    ring.settle([(e, 5, {bad: 1, late: 4}, "detail")])
    assert ring.ledger.failed == {bad: 1, late: 4}
    assert e.state is State.FAILED and e.outcome == late and e.committed_rows == 5
    assert ring.ledger.committed_rows == 5 and ring.rows == 0


async def test_drop_oldest_buffers_keep_one_request_per_entry() -> None:
    ring = Ring(1000, 100, WhenFull.DROP_OLDEST)
    ring.offer(entry())
    assert not ring.try_append(KEY, b"a", 1), "drop_oldest drops whole entries: they stay small"


async def test_block_waits_for_room_then_admits_in_order() -> None:
    ring = Ring(30, 100, WhenFull.BLOCK)
    ring.offer(entry(30))
    big, small = entry(20), entry(5)
    t_big = asyncio.create_task(ring.put(big, timeout=5))
    await asyncio.sleep(0)
    t_small = asyncio.create_task(ring.put(small, timeout=5))
    await asyncio.sleep(0)
    assert ring.blocked_writers == 2
    ring.release(ring.take(KEY, 1, 1000))
    await asyncio.wait_for(asyncio.gather(t_big, t_small), 1)
    assert big.seq < small.seq, "the writer that waited first is admitted first"


async def test_block_times_out_with_buffer_full() -> None:
    ring = Ring(10, 100, WhenFull.BLOCK)
    ring.offer(entry(10))
    with pytest.raises(BufferFull, match=r"waited 0\.05s"):
        await ring.put(entry(5), timeout=0.05)
    assert ring.blocked_writers == 0


async def test_close_refuses_and_releases_blocked_writers() -> None:
    ring = Ring(10, 100, WhenFull.BLOCK)
    ring.offer(entry(10))
    waiting = asyncio.create_task(ring.put(entry(5), timeout=5))
    await asyncio.sleep(0)
    ring.close()
    with pytest.raises(BufferClosed):
        await waiting
    with pytest.raises(BufferClosed):
        ring.offer(entry(1))
    assert ring.rows == 1, "rows already accepted stay to be flushed"


async def test_committed_waiter_resolves_on_release() -> None:
    ring = Ring(100, 100, WhenFull.REJECT)
    e = entry()
    e.waiter = asyncio.get_running_loop().create_future()
    ring.offer(e)
    ring.release(ring.take(KEY, 10, 100))
    await asyncio.wait_for(e.waiter, 1)


async def test_barrier_waits_for_entries_before_it_only() -> None:
    ring = Ring(1000, 1000, WhenFull.REJECT)
    ring.offer(entry(rows=3))
    ring.offer(entry(rows=4, key=("b", "CSV")))
    barrier = ring.barrier()
    ring.offer(entry(rows=5))  # after the barrier: not waited for
    ring.release(ring.take(KEY, 1, 1000))
    assert not barrier.done.done()
    ring.release(ring.take(("b", "CSV"), 10, 1000), Outcome(Reason.REJECTED_BY_CLICKHOUSE, "X"))
    await asyncio.wait_for(barrier.done, 1)
    assert barrier.outcome() == (3, 4)
    assert ring.rows == 5


async def test_barrier_on_empty_ring_is_done_at_once() -> None:
    ring = Ring(10, 10, WhenFull.REJECT)
    assert ring.barrier().done.done()


async def test_fail_outstanding_reports_every_remaining_row() -> None:
    ring = Ring(1000, 1000, WhenFull.REJECT)
    ring.offer(entry(rows=2))
    ring.offer(entry(rows=3))
    ring.take(KEY, 2, 1000)
    assert ring.fail_outstanding(Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT)) == 5
    assert ring.rows == 0 and ring.bytes == 0 and ring.emptied.is_set()
    assert ring.queued_keys() == []


async def test_oldest_age_uses_the_clock() -> None:
    clock = FakeClock()
    ring = Ring(100, 100, WhenFull.REJECT, clock)
    assert ring.oldest_age() == 0
    ring.offer(entry())
    clock.advance(2.5)
    assert ring.oldest_age() == 2.5


# ----- properties --------------------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=40)


class RingMachine(RuleBasedStateMachine):
    """Random offers, takes and releases under each policy; the books must always balance."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.ring = Ring(100, 20, WhenFull.REJECT, coalesce_bytes=60)
        self.in_flight: list[list[Entry]] = []
        self.accepted: dict[int, Entry] = {}
        self.order: dict[tuple[str, str], list[int]] = {}

    def teardown(self) -> None:
        self.loop.close()

    @rule(policy=st.sampled_from(list(WhenFull)))
    def set_policy(self, policy: WhenFull) -> None:
        self.ring.when_full = policy

    @rule(size=sizes, rows=st.integers(1, 5), key=st.sampled_from([("a", "CSV"), ("b", "CSV"), ("c", "TSV")]))
    def offer(self, size: int, rows: int, key: tuple[str, str]) -> None:
        e = Entry(key, b"r" * size, rows)
        try:
            self.ring.offer(e)
        except BufferFull:
            assert not self.ring._fits(e.size, e.rows) or self.ring.blocked_writers
            return
        self.accepted[e.seq] = e

    @rule(size=sizes, rows=st.integers(1, 5), key=st.sampled_from([("a", "CSV"), ("b", "CSV"), ("c", "TSV")]))
    def append(self, size: int, rows: int, key: tuple[str, str]) -> None:
        queue = self.ring._queues.get(key)
        tail = queue[-1] if queue else None
        before = (tail.rows, tail.size) if tail else None
        if self.ring.try_append(key, b"a" * size, rows):
            assert tail is not None and before is not None
            assert (tail.rows, tail.size) == (before[0] + rows, before[1] + size)
            assert tail.size <= self.ring.coalesce_bytes

    @precondition(lambda self: self.ring.queued_keys())
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.ring.queued_keys()))
        batch = self.ring.take(key, data.draw(st.integers(1, 10)), data.draw(st.integers(1, 80)))
        assert batch, "take returns at least one entry"
        seqs = [e.seq for e in batch]
        assert seqs == sorted(seqs)
        self.in_flight.append(batch)

    @precondition(lambda self: self.in_flight)
    @rule(ok=st.booleans(), data=st.data())
    def release(self, ok: bool, data: st.DataObject) -> None:
        batch = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        self.ring.release(batch, None if ok else Outcome(Reason.REJECTED_BY_CLICKHOUSE, "TEST"))

    @invariant()
    def within_bounds(self) -> None:
        assert 0 <= self.ring.bytes <= self.ring.max_bytes
        assert 0 <= self.ring.rows <= self.ring.max_rows

    @invariant()
    def books_balance(self) -> None:
        c = self.ring.ledger
        live = [e for e in self.accepted.values() if e.state in (State.PENDING, State.IN_FLIGHT)]
        assert c.accepted_rows == c.committed_rows + sum(c.failed.values()) + self.ring.rows
        assert self.ring.rows == sum(e.rows for e in live)
        assert self.ring.bytes == sum(e.size for e in live)
        assert self.ring.outstanding == len(live)

    @invariant()
    def queues_are_fifo(self) -> None:
        for key in self.ring.queued_keys():
            seqs = [e.seq for e in self.ring._queues[key]]
            assert seqs == sorted(seqs)


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.tuples(sizes, st.integers(1, 4)), max_size=60))
@settings(deadline=None)
def test_drop_oldest_keeps_newest_and_stays_bounded(items: list[tuple[int, int]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        ring = Ring(100, 12, WhenFull.DROP_OLDEST)
        kept: list[Entry] = []
        for size, rows in items:
            e = Entry(KEY, b"z" * size, rows)
            ring.offer(e)  # never raises: nothing is in flight, so room can always be made
            kept.append(e)
            assert ring.bytes <= 100 and ring.rows <= 12
        live = [e for e in kept if e.state is State.PENDING]
        # What survives is a suffix of what was sent: only the oldest are dropped.
        assert live == kept[len(kept) - len(live):]
        assert ring.ledger.failed.get(DROPPED, 0) == sum(
            e.rows for e in kept if e.state is State.FAILED)
    finally:
        loop.close()
