"""Which (table, format) key is due for a flush, and which may start one now: plain code, no I/O.

A key is *due* when its queue holds ``max_rows`` rows or ``max_bytes`` bytes (a full batch), when
its oldest row is ``max_age`` old, and at once while a flush barrier waits for some of its rows or
once the buffer refuses new rows. (A barrier makes only the keys it covers urgent: one waiting on a
held table must not turn every other table's trickle into an insert per request.) A partial batch
waits while the key has an insert running, and grows meanwhile, so a trickle of rows never becomes
a stream of tiny inserts.

*Slots*: up to ``concurrency`` keys have an insert running at once, and one key's backlog never
takes a slot another key needs. A key with a backlog also sends further full batches side by side
while fewer than ``concurrency`` inserts run in all — unless one of its inserts is being retried
(that would only add load to a table that is struggling). A key whose inserts are *held* (ClickHouse
refuses the whole table: it is missing, or a grant is) waits in backoff without taking a slot, so
other tables keep flowing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from buffer.ring import Key

# Draining while rows still arrive (a sidecar before SIGTERM): flush often, but not per request,
# or the application's last seconds would become hundreds of tiny inserts.
DRAINING_MAX_AGE = 0.1


@dataclass(frozen=True)
class FlushPolicy:
    max_rows: int
    max_bytes: int
    max_age: float
    concurrency: int = 1
    initial_backoff: float = 0.2
    max_backoff: float = 10.0


@dataclass(frozen=True, slots=True)
class Queued:
    """What waits under one key: rows, bytes, when its oldest entry was accepted, whether a flush
    barrier waits for some of it."""

    rows: int
    bytes: int
    oldest: float | None
    covered: bool = False


class Scheduler:
    def __init__(self, policy: FlushPolicy) -> None:
        self.policy = policy
        self.in_flight = 0  # inserts running, all keys
        self.busy: collections.Counter[Key] = collections.Counter()  # inserts running, by key
        self.retrying: collections.Counter[Key] = collections.Counter()  # of those, between retries
        self.held: collections.Counter[Key] = collections.Counter()  # of those, refused for the whole
        # table (it is missing, a grant is): they wait in backoff without taking a slot
        self.draining = False  # a drain began: flush young rows on a short interval
        self.refusing = False  # no more rows come: flush every key now

    # ----- decisions ------------------------------------------------------------------------

    def max_age(self) -> float:
        return min(self.policy.max_age, DRAINING_MAX_AGE) if self.draining else self.policy.max_age

    def due(self, key: Key, q: Queued, now: float) -> bool:
        if not q.rows:
            return False
        p = self.policy
        if q.rows >= p.max_rows or q.bytes >= p.max_bytes:
            return True  # a full batch goes out even while another of the key's batches is in flight
        if self.busy[key]:
            return False  # a partial batch waits for the key's insert to finish, and grows meanwhile
        if self.refusing or q.covered:
            return True
        return q.oldest is not None and now - q.oldest >= self.max_age()

    def can_start(self, key: Key) -> bool:
        if self.busy[key]:
            return not self.retrying[key] and self._active_inserts() < self.policy.concurrency
        return self._active_keys() < self.policy.concurrency

    def next_timeout(self, now: float, queued: Iterable[tuple[Key, Queued]], deadline: float | None) -> float | None:
        """Seconds until a key becomes due by age (or the deadline comes); None = only an event can
        make one due. A key with an insert running, or with no slot free, waits for a flush to
        finish (which wakes the loop), not for its age: a timeout then would only spin."""
        waits = []
        for key, q in queued:
            if self.busy[key] or not self.can_start(key) or q.oldest is None:
                continue
            waits.append(q.oldest + self.max_age() - now)
        if deadline is not None and deadline > now:  # once past, only events matter: never spin on it
            waits.append(deadline - now)
        return max(0.0, min(waits)) if waits else None

    # ----- what happened --------------------------------------------------------------------

    def started(self, key: Key) -> None:
        self.busy[key] += 1
        self.in_flight += 1

    def finished(self, key: Key) -> None:
        self.in_flight -= 1
        _decrement(self.busy, key)

    def retry_began(self, key: Key) -> None:
        self.retrying[key] += 1

    def retry_ended(self, key: Key) -> None:
        _decrement(self.retrying, key)

    def hold(self, key: Key) -> None:
        self.held[key] += 1

    def unhold(self, key: Key) -> None:
        _decrement(self.held, key)

    def _active_keys(self) -> int:
        return sum(1 for k, n in self.busy.items() if n > self.held[k])

    def _active_inserts(self) -> int:
        return self.in_flight - sum(self.held.values())


def _decrement(counter: collections.Counter[Key], key: Key) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
