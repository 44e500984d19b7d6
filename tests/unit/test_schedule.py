"""Which key is due and which may start: plain calls, no event loop, no clock but numbers."""

from __future__ import annotations

import pytest

from buffer.schedule import FlushPolicy, Queued, Scheduler

A, B, C = ("a", "JSONEachRow"), ("b", "JSONEachRow"), ("c", "CSV")


def sched(concurrency: int = 2, **kw: float) -> Scheduler:
    return Scheduler(FlushPolicy(**{"max_rows": 100, "max_bytes": 1000, "max_age": 1.0, "concurrency": concurrency,
                                    **kw}))  # type: ignore[arg-type]


def test_due_by_size_by_age_and_at_once_when_refusing_or_a_barrier_waits() -> None:
    s = sched()
    assert not s.due(A, Queued(0, 0, None), 10.0), "nothing queued"
    assert s.due(A, Queued(100, 10, 10.0), 10.0), "max_rows"
    assert s.due(A, Queued(1, 1000, 10.0), 10.0), "max_bytes"
    assert not s.due(A, Queued(5, 50, 10.0), 10.9), "young"
    assert s.due(A, Queued(5, 50, 10.0), 11.0), "old"
    assert s.due(A, Queued(5, 50, 10.0, covered=True), 10.0), "a barrier waits for these rows: now"
    s.refusing = True
    assert s.due(A, Queued(5, 50, 10.0), 10.0), "refusing: now"


def test_draining_flushes_young_rows_on_a_short_interval() -> None:
    s = sched(max_age=60.0)
    assert not s.due(A, Queued(5, 50, 10.0), 10.2)
    s.draining = True
    assert s.max_age() == 0.1 and s.due(A, Queued(5, 50, 10.0), 10.2)


def test_a_partial_batch_waits_for_its_keys_insert_a_full_one_does_not() -> None:
    s = sched()
    s.started(A)
    s.refusing = True
    assert not s.due(A, Queued(5, 50, 0.0), 100.0), "it grows while the insert runs"
    assert s.due(A, Queued(100, 50, 0.0), 100.0)


def test_slots_keys_first_then_side_by_side_batches_of_a_backlog() -> None:
    s = sched(concurrency=2)
    assert s.can_start(A)
    s.started(A)
    assert s.can_start(A), "a backlog may use an idle slot"
    assert s.can_start(B)
    s.started(B)
    assert not s.can_start(A) and not s.can_start(C), "two inserts in all"
    s.finished(B)
    s.started(A)
    assert not s.can_start(A), "two inserts of A in all"
    assert s.can_start(B), "but A's backlog never takes the slot another table needs: B may always start one"
    s.finished(A)
    s.finished(A)
    assert s.in_flight == 0 and not s.busy


def test_no_batch_beside_one_being_retried() -> None:
    s = sched(concurrency=4)
    s.started(A)
    s.retry_began(A)
    assert not s.can_start(A) and s.can_start(B)
    s.retry_ended(A)
    assert s.can_start(A) and not s.retrying


def test_a_held_table_waits_without_a_slot_so_others_keep_flowing() -> None:
    s = sched(concurrency=1)
    s.started(A)
    assert not s.can_start(B)
    s.retry_began(A)
    s.hold(A)
    assert s.can_start(B), "A is held in backoff: its slot goes to B"
    assert not s.can_start(A), "and A gets no second batch meanwhile"
    s.started(B)
    assert not s.can_start(C)
    s.unhold(A)
    s.retry_ended(A)
    assert not s.held and not s.retrying


def test_next_timeout_is_the_soonest_age_among_keys_that_could_start() -> None:
    s = sched(concurrency=1)
    queued = [(A, Queued(1, 1, 10.0)), (B, Queued(1, 1, 10.5))]
    assert s.next_timeout(10.2, queued, None) == pytest.approx(0.8)
    assert s.next_timeout(10.2, queued, deadline=10.4) == pytest.approx(0.2), "the deadline comes first"
    s.started(A)
    assert s.next_timeout(10.2, queued, None) is None, "no slot free: only a finished flush can help; never spin"
    assert s.next_timeout(20.0, [], None) is None
    assert s.next_timeout(10.0, [(C, Queued(1, 1, 5.0))], None) is None
