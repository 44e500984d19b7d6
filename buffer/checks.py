"""Startup checks against ClickHouse: each finding says what is wrong and what to do.

Run once at start (and by ``ingest-buffer check-config --connect``, which changes nothing in
ClickHouse). None of them stops the buffer — ClickHouse may be fixed while it runs — but each is
logged where an operator looks, in the same words a refused write or a held table uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from buffer.errors import bad_credentials, classify, error_code, missing_database, missing_table, quote_identifier
from buffer.sink import Sink

# Engines whose inserts deduplicate retries without further settings.
_REPLICATED = re.compile(r"^(Replicated|Shared)")
_WINDOW = re.compile(r"non_replicated_deduplication_window\s*=\s*(\d+)")
_NO_DEDUP_ENGINES = frozenset({"Memory", "Log", "TinyLog", "StripeLog", "Null", "Buffer", "File", "URL"})
RECOMMENDED_WINDOW = 1000


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    message: str
    unchecked: bool = False  # ClickHouse could not be checked at all (unreachable, refused us, locked)

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def startup_checks(sink: Sink, database: str, allowlist: tuple[str, ...], user: str = "") -> list[Finding]:
    try:
        schema = sink.schema()
        if not schema.database_exists:
            return [Finding("error", missing_database(database) + "; every write is refused with NOT_FOUND until "
                                                                  "then")]
        tables = sink.query_rows("SELECT name, engine, engine_full FROM system.tables WHERE database = {db:String}",
                                 {"db": database})
        default_window = sink.query_rows(
            "SELECT value FROM system.merge_tree_settings WHERE name = 'non_replicated_deduplication_window'")
    except Exception as exc:
        return [_connection_finding(exc, database, user)]
    findings: list[Finding] = []
    by_name = {str(name): (str(engine), str(full)) for name, engine, full in tables}
    if allowlist:
        for table in allowlist:
            if table not in by_name:
                findings.append(Finding("error", missing_table(database, table) + " — or remove it from --tables; "
                                        "writes to it are refused with NOT_FOUND until then"))
    elif not by_name:
        findings.append(Finding("warning", f"database {database!r} has no tables yet: every write is refused with "
                                           "NOT_FOUND until the application's tables exist"))
    default = int(default_window[0][0]) if default_window else 0
    for table in (allowlist or tuple(sorted(by_name))):
        if table not in by_name:
            continue
        engine, full = by_name[table]
        findings.extend(_dedup_finding(database, table, engine, full, default))
    return findings


def _dedup_finding(database: str, table: str, engine: str, full: str, default: int) -> list[Finding]:
    if _REPLICATED.match(engine):
        return []
    name = f"{quote_identifier(database)}.{quote_identifier(table)}"
    if engine.endswith("MergeTree"):
        m = _WINDOW.search(full)
        window = int(m.group(1)) if m else default
        if window == 0:
            return [Finding("warning", (
                f"table {database}.{table} ({engine}) has non_replicated_deduplication_window = 0, so a retry after "
                f"a lost reply could insert rows twice; fix: ALTER TABLE {name} MODIFY SETTING "
                f"non_replicated_deduplication_window = {RECOMMENDED_WINDOW}"))]
        return []
    if engine in _NO_DEDUP_ENGINES:
        return [Finding("warning", f"table {database}.{table} uses the {engine} engine, which does not deduplicate: "
                                   "a retry after a lost reply could insert rows twice")]
    return []


def _connection_finding(exc: Exception, database: str, user: str) -> Finding:
    failure = classify(exc)
    if failure.code in (192, 193, 194, 195, 516):
        return Finding("error", bad_credentials(user) + "; rows are buffered and held until it is fixed",
                       unchecked=True)
    if failure.code == 81:
        return Finding("error", missing_database(database), unchecked=True)
    if failure.code is None:
        return Finding("warning", (
            f"ClickHouse is not reachable ({failure.message[:200]}); rows are accepted up to the buffer's capacity "
            "and flushed once it answers"), unchecked=True)
    return Finding("warning", f"could not run the startup checks: {failure.name}: {failure.message[:300]}",
                   unchecked=True)


def embedded_engine_error(sink: Sink) -> str | None:
    """Why the embedded engine cannot be opened (its path is locked by another process…), or None."""
    try:
        sink.query_rows("SELECT 1")
        return None
    except Exception as exc:
        if error_code(exc) == 81:
            return None  # the engine opened; the database is missing (a finding of its own)
        return str(exc)
