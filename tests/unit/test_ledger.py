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


def test_exit_code_and_line_follow_what_was_lost() -> None:
    ledger = Ledger()
    ledger.accepted_rows = 10
    ledger.commit(7, 70)
    ledger.fail(Outcome(Reason.DEAD_LETTERED, "X"), 2)
    ledger.fail(Outcome(Reason.DROPPED_OLDEST), 1)
    assert ledger.exit_code(crashed=False) == EXIT_OK
    assert ledger.exit_line(False, []) == ("exiting: 7 rows reached ClickHouse, 2 refused for their data are in the "
                                           "dead-letter store, 1 were dropped as --when-full drop_oldest allows; "
                                           "none was lost")
    assert ledger.exit_code(crashed=True) == EXIT_CRASHED
    ledger.fail(Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT), 3)
    assert ledger.exit_code(crashed=False) == EXIT_ROWS_LOST and ledger.lost_rows == 3
    assert ledger.exit_line(False, []) == \
        "exiting with 3 accepted rows that did not reach ClickHouse (3 not flushed before exit)"
    summary = ledger.summary()
    assert summary["rows_lost"] == 3 and summary["rows_dead_lettered"] == 2 and summary["rows_dropped"] == 1
    assert summary["rows_failed"] == {"dead_lettered:X": 2, "dropped_oldest": 1, "not_flushed_before_exit": 3}


def test_rows_clickhouse_did_not_write_leave_the_committed_count_and_are_lost() -> None:
    ledger = Ledger()
    ledger.accepted_rows = 10
    ledger.commit(10, 100)
    ledger.not_written(3)
    assert ledger.committed_rows == 7 and ledger.lost_rows == 3 and ledger.mismatched_batches == 1
    assert ledger.accepted_rows == ledger.committed_rows + sum(ledger.failed.values()), "the books still balance"
    assert "7 rows reached" not in ledger.exit_line(False, []), "never claims more than ClickHouse took"


def test_refusals_are_counted_by_reason() -> None:
    ledger = Ledger()
    ledger.refuse("truncated", 10)
    ledger.refuse("truncated", 5)
    assert ledger.refused == {"truncated": [2, 15]}
