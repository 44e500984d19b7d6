"""Startup checks against a real ClickHouse: each finding names the problem and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from buffer.checks import startup_checks
from buffer.config import load
from buffer.sink import ClickHouseSink
from tests.conftest import ClickHouse


def checks(clickhouse: ClickHouse, tables: str = "", **flags: str) -> list[str]:
    cfg = load({"clickhouse_url": clickhouse.url, "database": clickhouse.database, "tables": tables or None,
                **flags}, env={})
    sink = ClickHouseSink(cfg)
    try:
        return [str(f) for f in startup_checks(sink, cfg.effective_database(), cfg.tables)]
    finally:
        sink.close()


def test_a_well_set_table_passes(clickhouse: ClickHouse) -> None:
    clickhouse.create("good", dedup_window=100)
    assert checks(clickhouse, "good") == []


def test_missing_allowlisted_table_is_an_error(clickhouse: ClickHouse) -> None:
    clickhouse.create("good")
    (finding,) = checks(clickhouse, "good,absent")
    assert finding.startswith("error:") and "table 'absent' does not exist in database" in finding
    assert "remove it from --tables" in finding


@pytest.mark.parametrize("tables", ["", "events"])
def test_a_missing_database_is_an_error_with_or_without_an_allowlist(clickhouse: ClickHouse, tables: str) -> None:
    (finding,) = checks(clickhouse, tables, database="no_such_db")
    assert finding == ("error: database 'no_such_db' does not exist in ClickHouse: create it (CREATE DATABASE "
                       "`no_such_db`) or fix --database; every write is refused with NOT_FOUND until then")


def test_zero_dedup_window_warns_with_the_alter_that_fixes_it(clickhouse: ClickHouse) -> None:
    clickhouse.create("risky", dedup_window=0)
    (finding,) = checks(clickhouse)
    assert finding.startswith("warning:") and "could insert rows twice" in finding
    alter = finding.split("fix: ", 1)[1]
    clickhouse.command(alter)  # the printed fix is valid SQL that fixes it
    assert checks(clickhouse) == []


def test_engine_without_dedup_warns(clickhouse: ClickHouse) -> None:
    clickhouse.command(f"CREATE TABLE {clickhouse.database}.mem (id UInt64) ENGINE = Memory")
    (finding,) = checks(clickhouse)
    assert "Memory engine, which does not deduplicate" in finding


async def test_findings_are_logged_at_start(clickhouse: ClickHouse, start_buffer: Callable[..., Any],
                                            caplog: pytest.LogCaptureFixture) -> None:
    clickhouse.create("risky", dedup_window=0)
    await start_buffer(tables="risky")
    assert any("MODIFY SETTING non_replicated_deduplication_window" in r.getMessage() for r in caplog.records)
