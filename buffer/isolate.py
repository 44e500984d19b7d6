"""Poison-row isolation: when ClickHouse refuses a batch for its data, find the bad rows.

The batch is tried in ever smaller groups: a refused group is halved, a refused single request is
cut into its rows (line formats), and a refused single row is a poison row. An entry that holds
several requests starts as one piece per request, so one odd request (a CSV field with a newline,
a row_count below its line count) cannot keep the others from splitting. Good groups are inserted
under tokens derived from the batch's, so a retry of the whole search inserts nothing twice; bad
rows go to the dead-letter store with ClickHouse's error. Only *poison* failures get here: errors
that refuse the whole batch whatever it holds (a missing table, a grant) are held, never split.

The insert function is passed in, so this is tested without ClickHouse.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from buffer.deadletter import DeadLetter
from buffer.errors import InsertFailure
from buffer.ledger import Outcome, Reason
from buffer.ring import Entry, Key

log = logging.getLogger(__name__)

_NOT_FLUSHED = Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT)
LINE_FORMATS = frozenset({"JSONEachRow", "JSONCompactEachRow", "CSV", "TabSeparated"})

# insert(payload parts, token, rows) → (the failure, or None once ClickHouse took them; how many of the
# rows ClickHouse said it did not write).
InsertFn = Callable[[list[bytes], str, int], Awaitable[tuple[InsertFailure | None, int]]]
# What Ring.settle takes: (entry, rows committed, {outcome: rows} for the others, detail).
Settlement = tuple[Entry, int, dict[Outcome, int], str]


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of an entry sent on its own while isolating poison rows."""

    entry: Entry
    data: bytes
    rows: int
    label: str  # stable within the batch, for deterministic deduplication tokens


@dataclass
class Isolation:
    """What the search found: rows committed per entry, poison pieces, pieces the deadline left unsent."""

    good: dict[int, int]  # id(entry) → rows committed
    unwritten: dict[int, int] = field(default_factory=dict)  # id(entry) → rows ClickHouse did not write
    bad: list[tuple[Piece, InsertFailure]] = field(default_factory=list)
    unsent: list[Piece] = field(default_factory=list)
    inserts: int = 0

    def letters(self, key: Key, token: str) -> list[DeadLetter]:
        # The whole shape: rows that came with a column list or parsing settings are replayed with them.
        table, fmt = key
        return [DeadLetter(table, fmt, f.code, f.name, f.message[:2000], p.rows, token, p.data) for p, f in self.bad]


async def isolate(batch: list[Entry], fmt: str, token: str, first: InsertFailure, insert: InsertFn,
                  past_deadline: Callable[[], bool]) -> Isolation:
    splittable = fmt in LINE_FORMATS
    found = Isolation({id(e): 0 for e in batch})
    groups: list[tuple[list[Piece], InsertFailure | None]] = [(
        [Piece(e, data, n, _label(e, i, lsn))
         for e in batch for i, ((data, n), lsn) in enumerate(zip(e.parts(), e.lsns(), strict=True))], first)]
    while groups:
        group, failure = groups.pop()
        if failure is None:
            if past_deadline():
                found.unsent.extend(group)
                continue
            rows = sum(p.rows for p in group)
            found.inserts += 1
            failure, short = await insert([p.data for p in group], f"{token}/{group[0].label}-{group[-1].label}",
                                          rows)
            if failure is None:
                for p in reversed(group):  # a shortfall is counted against the group's last rows
                    k = min(short, p.rows)
                    short -= k
                    found.good[id(p.entry)] += p.rows - k
                    if k:
                        found.unwritten[id(p.entry)] = found.unwritten.get(id(p.entry), 0) + k
                continue
            if failure.retryable:  # the deadline came while retrying
                found.unsent.extend(group)
                continue
        if len(group) > 1:
            mid = len(group) // 2
            groups.extend([(group[mid:], None), (group[:mid], None)])
        elif splittable and group[0].rows > 1 and len(rows_of := split_rows(group[0], fmt)) > 1:
            groups.append((rows_of, None))
        else:
            found.bad.append((group[0], failure))
    return found


def _label(entry: Entry, i: int, lsn: int) -> str:
    """A request's name in sub-insert tokens: its log sequence number when there is a log (the same
    after a restart, so a resent batch's sub-inserts deduplicate), else its place in the buffer."""
    if lsn:
        return f"l{lsn}"
    return str(entry.seq) if entry.extra is None else f"{entry.seq}+{i}"


def settle(key: Key, batch: list[Entry], token: str, found: Isolation, stored: bool,
           where: str, unsent: Outcome = _NOT_FLUSHED) -> list[Settlement]:
    """Each entry's outcome, and the one log line that says what became of the batch."""
    failed_of: dict[int, dict[Outcome, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    detail_of: dict[int, str] = {}
    reason = Reason.DEAD_LETTERED if stored else Reason.REJECTED_BY_CLICKHOUSE
    for p, f in found.bad:
        failed_of[id(p.entry)][Outcome(reason, f.name)] += p.rows
        detail_of.setdefault(id(p.entry), f.message[:500])
    for p in found.unsent:
        failed_of[id(p.entry)][unsent] += p.rows
        detail_of.setdefault(id(p.entry), "the drain deadline passed")
    for entry_id, n in found.unwritten.items():
        failed_of[entry_id][Outcome(Reason.NOT_WRITTEN)] += n
    bad_rows = sum(p.rows for p, _ in found.bad)
    good_rows = sum(found.good.values())
    unsent_rows = sum(p.rows for p in found.unsent)
    sample = found.bad[0][1] if found.bad else None
    table = key[0]
    log.log(logging.ERROR if bad_rows or unsent_rows else logging.WARNING,
            "split a batch of %d rows for %s to isolate rows ClickHouse refused: %d landed, %d %s%s%s", good_rows
            + bad_rows + unsent_rows, table, good_rows, bad_rows,
            ("dead-lettered to " + where) if stored else "refused and lost (no dead-letter store took them)",
            f", {unsent_rows} not flushed before the drain deadline" if unsent_rows else "",
            f" ({sample.name}: {sample.message[:300]})" if sample else "",
            extra={"table": table, "token": token, "rows_landed": good_rows,
                   "rows_dead_lettered": bad_rows if stored else 0, "rows_lost": (0 if stored else bad_rows)
                   + unsent_rows, "code": sample.code if sample else None, "inserts": found.inserts})
    return [(e, found.good[id(e)], dict(failed_of.get(id(e), {})), detail_of.get(id(e), "")) for e in batch]


def split_rows(piece: Piece, fmt: str) -> list[Piece]:
    """Cuts a line-format piece into single rows (CSV: never inside a quoted field)."""
    rows: list[bytes] = []
    start = 0
    data = piece.data
    quotes = 0
    for i, byte in enumerate(data):
        if fmt == "CSV" and byte == 0x22:
            quotes += 1
        elif byte == 0x0A and quotes % 2 == 0:
            rows.append(data[start:i + 1])
            start = i + 1
    if start < len(data):
        rows.append(data[start:])
    if len(rows) != piece.rows:
        return [piece]  # lines are not rows here (a CSV field with a newline…): it stays whole
    return [Piece(piece.entry, r, 1, f"{piece.label}.{n}") for n, r in enumerate(rows)]
