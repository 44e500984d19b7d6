"""The ledger of row outcomes: each reason's fate, the exit code and the words that read it."""

from __future__ import annotations

import pytest

from buffer.ledger import EXIT_CRASHED, EXIT_OK, EXIT_ROWS_LOST, Fate, Ledger, Outcome, Reason


@pytest.mark.parametrize(("reason", "fate"), [
    (Reason.DROPPED_OLDEST, Fate.DROPPED), (Reason.DEAD_LETTERED, Fate.KEPT),
    (Reason.REJECTED_BY_CLICKHOUSE, Fate.LOST), (Reason.NOT_FLUSHED_BEFORE_EXIT, Fate.LOST),
    (Reason.IN_DOUBT_AT_EXIT, Fate.LOST), (Reason.NOT_WRITTEN, Fate.LOST), (Reason.INTERNAL_ERROR, Fate.LOST),
    (Reason.DEAD_LETTERS_DELETED, Fate.LOST),
])
def test_every_reason_knows_whether_its_rows_are_lost_dropped_or_kept(reason: Reason, fate: Fate) -> None:
    assert reason.fate is fate and reason.words and reason.label == reason.value


def test_outcomes_read_as_label_and_words() -> None:
    o = Outcome(Reason.DEAD_LETTERED, "CANNOT_PARSE_TEXT")
    assert str(o) == "dead_lettered:CANNOT_PARSE_TEXT"
    assert o.describe() == "were refused by ClickHouse and written to the dead-letter store (CANNOT_PARSE_TEXT)"
    assert str(Outcome(Reason.INTERNAL_ERROR)) == "internal_error"


def ledger_of(committed: int, **failed: int) -> Ledger:
    ledger = Ledger()
    ledger.accepted_rows = committed + sum(failed.values())
    ledger.commit(committed, committed * 10)
    for name, rows in failed.items():
        reason, _, error = name.partition("__")
        ledger.fail(Outcome(Reason(reason), error), rows)
    return ledger


def test_exit_code_and_line_follow_what_was_lost() -> None:
    ok = ledger_of(7, dead_lettered__X=2, dropped_oldest=1)
    assert ok.exit_code(crashed=False) == EXIT_OK and ok.exit_code(crashed=True) == EXIT_CRASHED
    assert ok.exit_line(False, []) == ("exiting: 7 rows reached ClickHouse, 2 refused for their data are in the "
                                       "dead-letter store, 1 were dropped as --when-full drop_oldest allows; "
                                       "none was lost")
    lost = ledger_of(7, dead_lettered__X=2, dropped_oldest=1, not_flushed_before_exit=3)
    assert lost.exit_code(crashed=False) == EXIT_ROWS_LOST and lost.lost_rows == 3
    assert lost.exit_line(False, []) == \
        "exiting with 3 accepted rows that did not reach ClickHouse (3 not flushed before exit)"
    summary = lost.summary()
    assert summary["rows_lost"] == 3 and summary["rows_dead_lettered"] == 2 and summary["rows_dropped"] == 1
    assert summary["rows_failed"] == {"dead_lettered:X": 2, "dropped_oldest": 1, "not_flushed_before_exit": 3}


def test_rows_held_at_exit_are_lost_and_deleted_dead_letters_leave_the_kept_count() -> None:
    ledger = Ledger()
    ledger.accepted_rows = 10
    ledger.commit(6, 60)
    ledger.fail(Outcome(Reason.DEAD_LETTERED, "X"), 3)
    assert ledger.held_rows == 1
    assert ledger.exit_code(crashed=False) == EXIT_ROWS_LOST, "a row never settled is no success"
    assert ledger.exit_line(False, []).endswith("(1 never settled)")
    ledger.fail(Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT), 1)
    ledger.fail(Outcome(Reason.DEAD_LETTERS_DELETED), 2)
    assert ledger.held_rows == 0 and ledger.kept_rows == 1 and ledger.lost_rows == 3
    assert ledger.summary()["rows_dead_lettered"] == 1


def test_refusals_are_counted_by_reason() -> None:
    ledger = Ledger()
    ledger.refuse("truncated", 10)
    ledger.refuse("truncated", 5)
    assert ledger.refused == {"truncated": [2, 15]}
