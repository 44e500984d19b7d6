"""The bounded buffer between the gRPC handlers and the flusher.

Each accepted request becomes one :class:`Entry` (its payload is kept as the bytes object gRPC
handed over: no copy, no parsing), or, when it needs no ack of its own, joins the newest entry of
its key (``try_append``), so that a run of small writes costs the buffer one entry. Entries wait
in one FIFO per (table, format) key. The flusher *takes* a batch from a key; the batch's bytes
still count against the capacity until the flusher *releases* it, so the rows it holds never
take more than ``max_bytes`` plus one request, whatever ClickHouse does.

Every entry ends in exactly one of two states, committed or failed with an
:class:`~buffer.ledger.Outcome`, and the ring counts both in its :class:`~buffer.ledger.Ledger`:
``accepted == committed + failed + held`` at every moment.

Single-threaded: every method runs on the event loop. The flusher's insert threads never touch it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from buffer.ledger import Ledger, Outcome, Reason
from buffer.refusals import BufferClosed, BufferFull

__all__ = ["CLOSED", "Barrier", "BufferClosed", "BufferFull", "Entry", "EntryFailed", "Key", "Ring", "State",
           "WhenFull"]


class WhenFull(enum.Enum):
    BLOCK = "block"
    REJECT = "reject"
    DROP_OLDEST = "drop_oldest"


class State(enum.IntEnum):
    PENDING = 0
    IN_FLIGHT = 1
    COMMITTED = 2
    FAILED = 3


Key = tuple[str, str]  # (table, ClickHouse format name)


@dataclass(slots=True, eq=False)
class Entry:
    key: Key
    payload: bytes
    rows: int
    seq: int = 0
    accepted_at: float = 0.0
    state: State = State.PENDING
    outcome: Outcome | None = None  # why it failed, once FAILED
    committed_rows: int = 0  # of ``rows``, once settled: all of them, none, or (poison rows) some
    # Set only for COMMITTED acks: resolved when the entry leaves the buffer.
    waiter: asyncio.Future[None] | None = None
    # Payloads, row counts and lsns of later requests appended to this entry (Ring.try_append), in order.
    extra: list[tuple[bytes, int, int]] | None = None
    lsn: int = 0  # the request's number in the write-ahead log (0: no log)
    # Set on every entry of a batch resent after a restart: its token; on its first entry, how many
    # entries it holds. Such an entry never takes a new request, is never dropped, goes out whole.
    replay_token: str | None = None
    replay_count: int = 0
    # A DURABLE request whose fsync is still out: the flusher does not take it, nothing joins it,
    # so that should the fsync fail it can be taken back whole (Ring.withdraw).
    syncing: bool = False

    size: int = 0  # bytes of payload and extra, kept after they are released

    def __post_init__(self) -> None:
        self.size = len(self.payload)

    def parts(self) -> list[tuple[bytes, int]]:
        """(payload, rows) of each request in the entry, in order."""
        if self.extra is None:
            return [(self.payload, self.rows)]
        return [(self.payload, self.rows - sum(n for _, n, _ in self.extra)), *((p, n) for p, n, _ in self.extra)]

    def lsns(self) -> list[int]:
        """The log sequence numbers of the entry's requests, in order."""
        if self.extra is None:
            return [self.lsn]
        return [self.lsn, *(lsn for _, _, lsn in self.extra)]


class EntryFailed(Exception):
    """Raised into COMMITTED waiters whose rows left the buffer without reaching ClickHouse."""


@dataclass(eq=False)
class Barrier:
    """Completes once every entry outstanding when it was set has left the buffer."""

    upto_seq: int
    entries: list[Entry]
    done: asyncio.Future[None]

    def outcome(self) -> tuple[int, int]:
        """(rows committed, rows failed) among the entries the barrier covered."""
        settled = [e for e in self.entries if e.state in (State.COMMITTED, State.FAILED)]
        ok = sum(e.committed_rows for e in settled)
        return ok, sum(e.rows for e in settled) - ok


_DROPPED = Outcome(Reason.DROPPED_OLDEST)
CLOSED = "the buffer is draining and accepts no new rows: it is shutting down; send to another replica"


class Ring:
    def __init__(self, max_bytes: int, max_rows: int, when_full: WhenFull,
                 clock: Callable[[], float] = time.monotonic, *, ledger: Ledger | None = None,
                 batch_rows: int | None = None, batch_bytes: int | None = None,
                 coalesce_bytes: int = 256 * 1024) -> None:
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.when_full = when_full
        self.clock = clock
        # The flusher's batch sizes: a key that reaches one wakes it (unset: every arrival does), and
        # try_append never lets an entry grow past them.
        self._wake_rows = batch_rows or 1
        self._wake_bytes = batch_bytes or 1
        self.batch_rows = batch_rows or max_rows
        # The most try_append lets one entry grow to.
        self.coalesce_bytes = min(coalesce_bytes, batch_bytes) if batch_bytes else coalesce_bytes
        self.bytes = 0  # pending + in flight
        self.rows = 0
        self.ledger = ledger if ledger is not None else Ledger()
        self.on_dropped: Callable[[Entry], object] | None = None  # told of every entry drop_oldest drops
        self._seq = 0
        self._queues: dict[Key, collections.deque[Entry]] = {}
        self._queued_rows: dict[Key, int] = collections.defaultdict(int)
        self._queued_bytes: dict[Key, int] = collections.defaultdict(int)
        # Every entry not yet committed or failed, in acceptance order (seq increases).
        self._outstanding: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._blocked: collections.deque[tuple[Entry, asyncio.Future[None]]] = collections.deque()
        self._barriers: list[Barrier] = []
        self._closed = False
        # Set when an entry is added that may need the flusher's attention.
        self.arrived = asyncio.Event()
        # Set whenever the buffer becomes empty, and whenever entries leave it (room may have freed).
        self.emptied = asyncio.Event()
        self.emptied.set()
        self.released = asyncio.Event()

    # ----- admission -----------------------------------------------------------------------

    def _fits(self, size: int, rows: int) -> bool:
        return self.bytes + size <= self.max_bytes and self.rows + rows <= self.max_rows

    def retry_after(self) -> float:
        """A hint for rejected clients: roughly how long until there may be room."""
        return 0.5 if self.bytes < self.max_bytes else 1.0

    def try_admit(self, entry: Entry) -> bool:
        """Adds the entry if it fits right now without dropping or waiting; False otherwise."""
        if self._closed or self._blocked or not self._fits(entry.size, entry.rows):
            return False
        self._admit(entry)
        return True

    def try_append(self, key: Key, payload: bytes, rows: int, lsn: int = 0) -> bool:
        """Adds the rows to the newest entry queued under ``key``, if it can take them now.

        Small writes in a row then cost one entry, not one each: the buffer's and the flusher's
        work per entry is most of their cost per request. Only for requests that need no ack of
        their own (the caller's choice: BUFFERED, a line format, whose rows a poison-row search can
        still split), and never into an entry someone waits on, one a flush barrier covers, or one
        past ``coalesce_bytes``.
        """
        if self._closed or self._blocked or self.when_full is WhenFull.DROP_OLDEST:
            return False  # (drop_oldest drops whole entries: they stay one request each)
        return self._join(key, payload, rows, lsn)

    def join_from_log(self, key: Key, payload: bytes, rows: int, lsn: int, *, counted: bool = False) -> bool:
        """try_append for a request read back from the write-ahead log: whatever the policy and even
        while draining (it was acknowledged long ago). ``counted`` as for admit_from_log."""
        if not self._join(key, payload, rows, lsn):
            return False
        if counted:
            self._uncount(rows, len(payload))
        return True

    def _uncount(self, rows: int, size: int) -> None:
        """Takes back the ledger's count of a request just added: it was counted in when it was
        accepted onto disk."""
        ledger = self.ledger
        ledger.accepted_rows -= rows
        ledger.accepted_bytes -= size
        ledger.accepted_requests -= 1

    def _join(self, key: Key, payload: bytes, rows: int, lsn: int) -> bool:
        queue = self._queues.get(key)
        if not queue:
            return False
        tail = queue[-1]
        if tail.replay_token is not None or tail.syncing:
            return False  # a resent batch holds exactly what it held; a DURABLE one may yet be taken back
        size = len(payload)
        if (tail.waiter is not None or tail.size + size > self.coalesce_bytes or not self._fits(size, rows)
                or tail.rows + rows > self.batch_rows
                or (self._barriers and tail.seq <= self._barriers[-1].upto_seq)):
            return False
        if tail.extra is None:
            tail.extra = [(payload, rows, lsn)]
        else:
            tail.extra.append((payload, rows, lsn))
        tail.rows += rows
        tail.size += size
        self._accepted(key, rows, size, False)
        return True

    def withdraw(self, entry: Entry) -> bool:
        """Takes back an entry not yet taken by the flusher, as if it had never been accepted (its
        write failed to reach the log); False when it is already on its way to ClickHouse."""
        if entry.state is not State.PENDING or entry.seq not in self._outstanding:
            return False
        queue = self._queues[entry.key]
        queue.remove(entry)  # rare: a failing disk
        self._dequeued(entry)
        del self._outstanding[entry.seq]
        self.bytes -= entry.size
        self.rows -= entry.rows
        ledger = self.ledger
        ledger.accepted_rows -= entry.rows
        ledger.accepted_bytes -= entry.size
        ledger.accepted_requests -= 1
        entry.state = State.FAILED
        self._after_release()
        return True

    def readmit(self, entries: list[Entry]) -> None:
        """Adds entries read back from the write-ahead log, in order, whatever the room: the caller
        bounds what it reads back (a resent batch is at most one batch)."""
        for entry in entries:
            self._admit(entry)

    def offer(self, entry: Entry) -> None:
        """Adds the entry now or raises BufferFull / BufferClosed. Never waits."""
        if self._closed:
            raise BufferClosed(CLOSED)
        if entry.size > self.max_bytes or entry.rows > self.max_rows:
            raise ValueError("entry larger than the whole buffer")
        if self.try_admit(entry):
            return
        if self.when_full is WhenFull.DROP_OLDEST and not self._blocked:
            self._drop_oldest_for(entry)
            if self.try_admit(entry):
                return
        raise BufferFull(self._full_message(), self.retry_after())

    def admit_from_log(self, entry: Entry, *, counted: bool = False) -> bool:
        """Adds a request read back from the write-ahead log if it fits now, whatever the policy and
        even while draining (it was acknowledged long ago); False when there is no room yet.
        ``counted``: the ledger counted it in when it was accepted onto disk (a spilled request)."""
        if not self._fits(entry.size, entry.rows):
            return False
        self._admit(entry)
        if counted:
            self._uncount(entry.rows, entry.size)
        return True

    async def put(self, entry: Entry, timeout: float) -> None:
        """Adds the entry, waiting up to ``timeout`` for room when the policy is BLOCK."""
        if self.when_full is not WhenFull.BLOCK or timeout <= 0:
            self.offer(entry)
            return
        if self._closed:
            raise BufferClosed(CLOSED)
        if self.try_admit(entry):
            return
        # Waiters are admitted strictly in arrival order so a large request is not starved.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (entry, fut)
        self._blocked.append(item)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if fut.done() and fut.exception() is None:
                return  # admitted at the last moment
            self._remove_blocked(item)
            raise BufferFull(self._full_message() + f"; waited {timeout:g}s", self.retry_after()) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Admitted, but the caller went away: the rows stay accepted (nothing is lost,
                # the client simply gets no ack and may resend).
                raise
            self._remove_blocked(item)
            raise

    def _remove_blocked(self, item: tuple[Entry, asyncio.Future[None]]) -> None:
        with contextlib.suppress(ValueError):
            self._blocked.remove(item)
        self._admit_blocked()

    def _full_message(self) -> str:
        return (f"buffer full: {self.bytes}/{self.max_bytes} bytes, {self.rows}/{self.max_rows} rows "
                f"held while ClickHouse catches up")

    def _admit(self, entry: Entry) -> None:
        # On every request's path: local names, one hash of the key per dictionary.
        key, rows, size = entry.key, entry.rows, entry.size
        self._seq = seq = self._seq + 1
        entry.seq = seq
        entry.accepted_at = self.clock()
        entry.state = State.PENDING
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
        queue.append(entry)
        self._outstanding[seq] = entry
        self.emptied.clear()
        self._accepted(key, rows, size, new_key=len(queue) == 1)

    def _accepted(self, key: Key, rows: int, size: int, new_key: bool) -> None:
        """Counts a request's rows in (a new entry, or the newest entry of its key)."""
        queued_rows = self._queued_rows[key] = self._queued_rows[key] + rows
        queued_bytes = self._queued_bytes[key] = self._queued_bytes[key] + size
        self.bytes += size
        self.rows += rows
        c = self.ledger
        c.accepted_rows += rows
        c.accepted_bytes += size
        c.accepted_requests += 1
        # Wake the flusher only when it has something new to decide: a key that was empty (its age
        # timer starts) or a key that reached a flush size. Waking it per request costs throughput.
        if new_key or queued_rows >= self._wake_rows or queued_bytes >= self._wake_bytes:
            self.arrived.set()

    def _admit_blocked(self) -> None:
        while self._blocked:
            entry, fut = self._blocked[0]
            if fut.done():  # timed out or cancelled
                self._blocked.popleft()
                continue
            if not self._fits(entry.size, entry.rows):
                return
            self._blocked.popleft()
            self._admit(entry)
            fut.set_result(None)

    def _drop_oldest_for(self, entry: Entry) -> None:
        while not self._fits(entry.size, entry.rows):
            victim = self._oldest_pending()
            if victim is None:
                return  # everything left is in flight; nothing may be dropped
            queue = self._queues[victim.key]
            queue.popleft()
            self._dequeued(victim)
            self._finish(victim, _DROPPED)
            if self.on_dropped is not None:
                self.on_dropped(victim)

    def _oldest_pending(self) -> Entry | None:
        """The oldest entry drop_oldest may drop: a resent batch goes out whole under its token, or not at all."""
        best: Entry | None = None
        for queue in self._queues.values():
            if queue and queue[0].replay_token is None and (best is None or queue[0].seq < best.seq):
                best = queue[0]
        return best

    def close(self) -> None:
        """Stops admission. Writers blocked for room get BufferClosed; queued rows stay."""
        self._closed = True
        while self._blocked:
            _, fut = self._blocked.popleft()
            if not fut.done():
                fut.set_exception(BufferClosed("the buffer started draining while this write waited for room: "
                                               "it is shutting down; send to another replica"))

    @property
    def closed(self) -> bool:
        return self._closed

    # ----- the flusher's side ---------------------------------------------------------------

    def queued_keys(self) -> list[Key]:
        return [k for k, q in self._queues.items() if q]

    def queued(self, key: Key) -> tuple[int, int, float | None, bool]:
        """(rows, bytes, acceptance time of the oldest entry, whether a flush barrier covers some of
        them) waiting under ``key``."""
        queue = self._queues.get(key)
        if not queue:
            return 0, 0, None, False
        head = queue[0]
        # Barriers are set in order, so the newest covers the most; a queue's head is its oldest entry.
        covered = bool(self._barriers) and head.seq <= self._barriers[-1].upto_seq
        return self._queued_rows[key], self._queued_bytes[key], head.accepted_at, covered

    def take(self, key: Key, max_rows: int, max_bytes: int) -> list[Entry]:
        """Removes up to max_rows/max_bytes from the key's queue (at least one entry, unless the first
        waits for its fsync); a batch resent after a restart comes out exactly as it was, whatever
        its size. A DURABLE entry still waiting for its fsync ends the batch before it."""
        queue = self._queues.get(key)
        batch: list[Entry] = []
        rows = size = 0
        exact = queue[0].replay_count if queue and queue[0].replay_token is not None else 0
        while queue:
            head = queue[0]
            if head.syncing:
                break
            if exact:
                if len(batch) == exact:
                    break
            elif batch and (rows + head.rows > max_rows or size + head.size > max_bytes
                            or head.replay_token is not None):
                break
            queue.popleft()
            self._dequeued(head)
            head.state = State.IN_FLIGHT
            batch.append(head)
            rows += head.rows
            size += head.size
        return batch

    def _dequeued(self, entry: Entry) -> None:
        self._queued_rows[entry.key] -= entry.rows
        self._queued_bytes[entry.key] -= entry.size
        if not self._queues[entry.key]:
            del self._queues[entry.key]
            del self._queued_rows[entry.key]
            del self._queued_bytes[entry.key]

    def release(self, batch: Iterable[Entry], outcome: Outcome | None = None) -> None:
        """The flusher is done with a batch: committed to ClickHouse (no outcome), or failed."""
        for entry in batch:
            self._finish(entry, outcome)
        self._after_release()

    def settle(self, outcomes: Iterable[tuple[Entry, int, dict[Outcome, int], str]]) -> None:
        """Per-entry outcomes of a batch: (entry, rows committed, {outcome: rows} for the others, detail).

        The entry's own outcome is the one covering most of its failed rows; the ledger gets every
        outcome's rows.
        """
        for entry, committed_rows, failed, detail in outcomes:
            if committed_rows >= entry.rows:
                self._finish(entry, None)
            else:
                main = max(failed, key=lambda o: failed[o]) if failed else Outcome(Reason.INTERNAL_ERROR)
                self._finish(entry, main, committed_rows, detail, failed)
        self._after_release()

    def fail_outstanding(self, outcome: Outcome) -> int:
        """Marks every remaining entry failed (at exit); returns the rows affected."""
        self._queues.clear()
        self._queued_rows.clear()
        self._queued_bytes.clear()
        rows = 0
        for entry in list(self._outstanding.values()):
            rows += entry.rows
            self._finish(entry, outcome)
        self._after_release()
        return rows

    def _finish(self, entry: Entry, outcome: Outcome | None, committed_rows: int = 0, detail: str = "",
                breakdown: dict[Outcome, int] | None = None) -> None:
        """Settles one entry: committed when ``outcome`` is None, else failed (``committed_rows`` of it
        excepted, and ``breakdown`` saying which outcome each other row had)."""
        if entry.state in (State.COMMITTED, State.FAILED):
            return
        entry.state = State.COMMITTED if outcome is None else State.FAILED
        entry.outcome = outcome
        entry.committed_rows = entry.rows if outcome is None else committed_rows
        del self._outstanding[entry.seq]
        self.bytes -= entry.size
        self.rows -= entry.rows
        ledger = self.ledger
        if outcome is None:
            ledger.commit(entry.rows, entry.size)
        else:
            ledger.committed_rows += entry.committed_rows
            failed = entry.rows - entry.committed_rows
            for why, n in (breakdown or {}).items():
                ledger.fail(why, n)
                failed -= n
            ledger.fail(outcome, failed)
        if entry.waiter is not None and not entry.waiter.done():
            if outcome is None:
                entry.waiter.set_result(None)
            else:
                failed = entry.rows - entry.committed_rows
                entry.waiter.set_exception(EntryFailed(
                    f"{failed} of {entry.rows} rows {outcome.describe()}" + (f": {detail}" if detail else "")))
                # A client that stopped waiting must not turn this into an "exception never
                # retrieved" log line; one still awaiting gets the exception all the same.
                entry.waiter.exception()
        # The payload can be large; drop it as soon as the entry is settled.
        entry.payload = b""
        entry.extra = None

    def _after_release(self) -> None:
        self.released.set()
        self._admit_blocked()
        if self._barriers:
            low = next(iter(self._outstanding), None)
            still = []
            for b in self._barriers:
                if low is None or low > b.upto_seq:
                    if not b.done.done():
                        b.done.set_result(None)
                else:
                    still.append(b)
            self._barriers = still
        if not self._outstanding:
            self.emptied.set()

    # ----- barriers and introspection --------------------------------------------------------

    def barrier(self) -> Barrier:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        b = Barrier(self._seq, list(self._outstanding.values()), fut)
        if not b.entries:
            fut.set_result(None)
        else:
            self._barriers.append(b)
        return b

    def oldest_age(self) -> float:
        """Seconds since the oldest row not yet settled was accepted (0 when empty)."""
        oldest = next(iter(self._outstanding.values()), None)
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest.accepted_at)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def blocked_writers(self) -> int:
        return len(self._blocked)
