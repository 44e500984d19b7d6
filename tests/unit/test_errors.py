"""The retry table: one test per class of failure."""

from __future__ import annotations

import pytest

from buffer.errors import HOLD, PERMANENT, RETRYABLE, UNKNOWN_CODE_ATTEMPTS, Kind, classify, held_advice
from tests.fakes import ClickHouseError


def test_tables_do_not_overlap() -> None:
    assert not set(RETRYABLE) & set(PERMANENT)
    assert not set(HOLD) & (set(RETRYABLE) | set(PERMANENT))


@pytest.mark.parametrize("code", [252, 241, 202, 159, 209, 210, 3])
def test_server_pressure_and_transport_codes_are_retried(code: int) -> None:
    f = classify(ClickHouseError(code, "X"))
    assert f.retryable and f.code == code and f.name == RETRYABLE[code]


@pytest.mark.parametrize("code", [27, 26, 6, 53, 16, 117, 33])
def test_data_errors_are_permanent(code: int) -> None:
    f = classify(ClickHouseError(code, "X"))
    assert not f.retryable and f.kind is Kind.POISON and f.name == PERMANENT[code]


@pytest.mark.parametrize(("code", "advice"), [
    (60, "table 'events' does not exist in database 'app': create it first"),
    (81, "database 'app' does not exist in ClickHouse: create it (CREATE DATABASE `app`) or fix --database"),
    (497, "user 'writer' may not insert into app.events: GRANT INSERT ON `app`.`events` TO `writer`"),
    (516, "ClickHouse rejected the credentials of user 'writer'"),
    (164, "user 'writer' is read-only"),
    (242, "ClickHouse refuses inserts into app.events (TABLE_IS_READ_ONLY)"),
])
def test_errors_that_refuse_the_whole_batch_hold_it_with_advice(code: int, advice: str) -> None:
    f = classify(ClickHouseError(code, "X"), attempt=100)
    assert f.kind is Kind.HOLD and f.retryable and f.name == HOLD[code], "never poison, however often it fails"
    assert held_advice(f, "app", "events", "writer").startswith(advice)


@pytest.mark.parametrize("exc", [ConnectionRefusedError("refused"), TimeoutError("timed out"), OSError("reset")])
def test_no_answer_at_all_is_retried(exc: Exception) -> None:
    f = classify(exc)
    assert f.retryable and f.code is None and f.name == "NETWORK"


def test_clickhouse_connect_operational_error_is_retried() -> None:
    from clickhouse_connect.driver.exceptions import OperationalError

    assert classify(OperationalError("HTTPConnectionPool: Max retries exceeded")).retryable


def test_unknown_code_is_retried_then_given_up() -> None:
    exc = ClickHouseError(4242, "NEW")
    assert classify(exc, attempt=1).retryable
    assert not classify(exc, attempt=UNKNOWN_CODE_ATTEMPTS).retryable


def test_code_attribute_wins_over_message() -> None:
    exc = Exception("no code in text")
    exc.code = 252  # type: ignore[attr-defined]
    assert classify(exc).name == "TOO_MANY_PARTS"


def test_messages_are_cleaned_for_readers() -> None:
    from buffer.errors import clean_message

    raw = ("Code: 26. DB::Exception: Code: 26. DB::Exception: Cannot parse quoted string: (at row 1)\n"
           ": (in file/uri /tmp/tmpsgnpu_li.raw): While executing ParallelParsingBlockInputFormat: While executing "
           "File: data for INSERT was parsed from file. (CANNOT_PARSE_QUOTED_STRING) (version 26.9.2.1)")
    assert clean_message(raw) == ("Code: 26. DB::Exception: Cannot parse quoted string: (at row 1) "
                                  "(CANNOT_PARSE_QUOTED_STRING) (version 26.9.2.1)")
