"""One ledger of what became of every row: the exit code, the probes, the logs and the metrics read it.

Rows come in (received, then accepted or refused), and every accepted row ends in exactly one
place: committed to ClickHouse, or failed with an :class:`Outcome` — a :class:`Reason` (and, where
ClickHouse gave one, its error name). Each reason knows its :class:`Fate`: the rows are *lost*,
*dropped* on purpose (the configured full policy), or *kept* out of ClickHouse somewhere an operator
can get them back (the dead-letter store). The books balance at every moment::

    accepted_rows == committed_rows + failed rows (all reasons but DEAD_LETTERS_DELETED) + rows held

``DEAD_LETTERS_DELETED`` is the one later event: rows already counted as dead-lettered (kept) whose
file the full store deleted — they are lost too, and counted as such.

Single-threaded: every method runs on the event loop (metrics read snapshots of it, see telemetry).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_CONFIG = 2
EXIT_ROWS_LOST = 3
EXIT_KEPT_IN_LOG = 4  # nothing lost, but rows wait in the write-ahead log for the next start


class Fate(enum.Enum):
    LOST = "lost"
    DROPPED = "dropped"  # on purpose, as configured
    KEPT = "kept"  # not in ClickHouse, but on disk where an operator can replay it
    LOGGED = "logged"  # in the write-ahead log: the next start flushes them


class Reason(enum.Enum):
    """Why accepted rows did not reach ClickHouse. The value is the label in metrics and logs."""

    def __new__(cls, label: str, fate: Fate, words: str) -> Reason:
        member = object.__new__(cls)
        member._value_ = label
        member.fate = fate
        member.words = words
        return member

    fate: Fate
    words: str

    @property
    def label(self) -> str:
        return str(self.value)

    DROPPED_OLDEST = ("dropped_oldest", Fate.DROPPED,
                      "were dropped to make room for newer rows (when_full=drop_oldest)")
    DEAD_LETTERED = ("dead_lettered", Fate.KEPT,
                     "were refused by ClickHouse and written to the dead-letter store")
    REJECTED_BY_CLICKHOUSE = ("rejected_by_clickhouse", Fate.LOST,
                              "were refused by ClickHouse and could not be written to the dead-letter store")
    NOT_FLUSHED_BEFORE_EXIT = ("not_flushed_before_exit", Fate.LOST, "were not flushed before the drain deadline")
    IN_DOUBT_AT_EXIT = ("in_doubt_at_exit", Fate.LOST,
                        "were being inserted when the drain deadline passed (ClickHouse may have them)")
    NOT_WRITTEN = ("not_written_by_clickhouse", Fate.LOST,
                   "were in an insert ClickHouse acknowledged but reported fewer rows written for")
    INTERNAL_ERROR = ("internal_error", Fate.LOST, "were lost to an internal error of the buffer (its log has "
                                                   "the traceback)")
    KEPT_IN_LOG = ("kept_in_log", Fate.LOGGED,
                   "were not flushed before the drain deadline and stay in the write-ahead log for the next start")
    UNREADABLE_IN_LOG = ("unreadable_in_log", Fate.LOST,
                         "were accepted onto disk while the buffer's memory was full and could not be read back "
                         "(the write-ahead log was damaged)")
    DEAD_LETTERS_DELETED = ("dead_letters_deleted", Fate.LOST,
                            "were deleted from the dead-letter store when it grew past --dead-letter-max-bytes")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reason, with the ClickHouse error that caused it where there is one."""

    reason: Reason
    error: str = ""

    @property
    def fate(self) -> Fate:
        return self.reason.fate

    def describe(self) -> str:
        return self.reason.words + (f" ({self.error})" if self.error else "")

    def __str__(self) -> str:
        return self.reason.label + (f":{self.error}" if self.error else "")


_DELETED = Outcome(Reason.DEAD_LETTERS_DELETED)


class Ledger:
    """Counts rows in and out. The hot path touches plain integer attributes only."""

    def __init__(self) -> None:
        # Requests as they arrive (framing valid or not) and those refused, by refusal reason.
        self.received_requests = 0
        self.duplicate_requests = 0  # keyed Writes resent after the first was accepted: answered, not added
        self.received_rows = 0  # rows in requests whose framing was valid
        self.received_bytes = 0
        self.refused: dict[str, list[int]] = {}  # reason label → [requests, bytes]
        self.accepted_requests = 0
        self.accepted_rows = 0
        self.accepted_bytes = 0
        self.committed_rows = 0
        self.committed_bytes = 0
        self.failed: dict[Outcome, int] = {}
        self.recounted_rows = 0  # counted in by lines, found fewer by ClickHouse (quoted CSV newlines)
        # By the way the rows came in: [requests answered OK, rows in them, requests refused].
        self.protocols: dict[str, list[int]] = {"grpc": [0, 0, 0], "clickhouse_http": [0, 0, 0]}

    # ----- entries ---------------------------------------------------------------------------

    def refuse(self, reason: str, size: int) -> None:
        counts = self.refused.get(reason)
        if counts is None:
            counts = self.refused[reason] = [0, 0]
        counts[0] += 1
        counts[1] += size

    def answered(self, protocol: str, requests: int, rows: int) -> None:
        counts = self.protocols[protocol]
        counts[0] += requests
        counts[1] += rows

    def commit(self, rows: int, size: int) -> None:
        self.committed_rows += rows
        self.committed_bytes += size

    def fail(self, outcome: Outcome, rows: int) -> None:
        if rows:
            self.failed[outcome] = self.failed.get(outcome, 0) + rows

    def recount(self, rows: int) -> None:
        """``rows`` that were counted in (and committed) were never rows: ClickHouse's count is the true one."""
        self.received_rows -= rows
        self.accepted_rows -= rows
        self.committed_rows -= rows
        self.recounted_rows += rows

    # ----- reading ---------------------------------------------------------------------------

    def rows_by(self, fate: Fate) -> int:
        return sum(n for o, n in self.failed.items() if o.fate is fate)

    @property
    def lost_rows(self) -> int:
        return self.rows_by(Fate.LOST)

    @property
    def kept_rows(self) -> int:
        """Rows in the dead-letter store now: dead-lettered, less those the full store deleted since."""
        return self.rows_by(Fate.KEPT) - self.failed.get(_DELETED, 0)

    @property
    def held_rows(self) -> int:
        """Accepted rows with no outcome yet: in the buffer (or, at exit, unaccounted for: lost)."""
        settled = sum(n for o, n in self.failed.items() if o.reason is not Reason.DEAD_LETTERS_DELETED)
        return self.accepted_rows - self.committed_rows - settled

    def by_reason(self, fate: Fate | None = None) -> dict[Reason, int]:
        """{reason: rows}, every error of a reason summed."""
        out: dict[Reason, int] = {}
        for o, n in self.failed.items():
            if fate is None or o.fate is fate:
                out[o.reason] = out.get(o.reason, 0) + n
        return out

    def summary(self) -> dict[str, Any]:
        """The counts an operator reads: in the final log line, /readyz and /drain."""
        return {"rows_accepted": self.accepted_rows, "rows_committed": self.committed_rows,
                "rows_lost": self.lost_rows, "rows_dropped": self.rows_by(Fate.DROPPED),
                "rows_dead_lettered": self.kept_rows, "rows_held": self.held_rows,
                "rows_kept_in_log": self.rows_by(Fate.LOGGED),
                "rows_in_doubt": self.by_reason().get(Reason.IN_DOUBT_AT_EXIT, 0),
                "rows_failed": {str(o): n for o, n in self.failed.items()}}

    def exit_code(self, crashed: bool) -> int:
        """At exit, rows still held (there should be none: the flusher settles them) count as lost."""
        if crashed:
            return EXIT_CRASHED
        if self.lost_rows or self.held_rows:
            return EXIT_ROWS_LOST
        return EXIT_KEPT_IN_LOG if self.rows_by(Fate.LOGGED) else EXIT_OK

    def exit_line(self, crashed: bool, faults: list[str], log_dir: str = "") -> str:
        """The last line the process logs: never more than the ledger can back."""
        if crashed:
            return "exiting after an internal failure: " + "; ".join(faults)
        lost, held = self.lost_rows, self.held_rows
        if lost or held:
            parts = [f"{n} {r.label.replace('_', ' ')}" for r, n in self.by_reason(Fate.LOST).items()]
            if held:
                parts.append(f"{held} never settled")
            return f"exiting with {lost + held} accepted rows that did not reach ClickHouse ({', '.join(parts)})"
        where = f" ({log_dir})" if log_dir else ""
        line = f"exiting: {self.committed_rows} rows reached ClickHouse"
        logged = self.rows_by(Fate.LOGGED)
        if logged:
            line += f", {logged} stay in the write-ahead log{where} for the next start"
        kept, dropped = self.kept_rows, self.rows_by(Fate.DROPPED)
        if kept:
            line += f", {kept} refused for their data are in the dead-letter store"
        if dropped:
            line += f", {dropped} were dropped as --when-full drop_oldest allows"
        return line + "; none was lost"
