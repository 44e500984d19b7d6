"""Which ClickHouse failures are worth retrying: one table, in one place.

A failure is one of three kinds:

* *retry*: the server, the network or the load is the problem: back off and try again with the
  same deduplication token;
* *hold*: ClickHouse refuses the whole batch whatever its rows hold — the table or database is
  missing, a grant or the credentials are wrong. The rows are fine and the operator can fix it, so
  the table's batches are held and retried (never split, never dead-lettered), loudly;
* *poison*: the rows themselves are wrong (parse errors, type mismatches): retrying can never
  succeed, so the batch is split to find them.

An error code in no list is retried a few times, then treated as poison, so an unforeseen error can
never block the queue forever.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# code → name, for log lines and metrics labels.
RETRYABLE: dict[int, str] = {
    3: "UNEXPECTED_END_OF_FILE",  # the request body was cut on its way
    32: "ATTEMPT_TO_READ_AFTER_EOF",
    159: "TIMEOUT_EXCEEDED",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    252: "TOO_MANY_PARTS",
    285: "TOO_FEW_LIVE_REPLICAS",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    473: "DEADLOCK_AVOIDED",
    999: "KEEPER_EXCEPTION",
    1000: "POCO_EXCEPTION",
}

# The whole batch is refused whatever its rows hold; the operator can fix it (create, grant, log in).
HOLD: dict[int, str] = {
    60: "UNKNOWN_TABLE",
    81: "UNKNOWN_DATABASE",
    164: "READONLY",  # the user is read-only
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    194: "REQUIRED_PASSWORD",
    195: "IP_ADDRESS_NOT_ALLOWED",
    218: "TABLE_IS_DROPPED",
    242: "TABLE_IS_READ_ONLY",  # a replica without its Keeper session, or a read-only table
    291: "DATABASE_ACCESS_DENIED",
    497: "ACCESS_DENIED",  # a grant is missing
    516: "AUTHENTICATION_FAILED",
}

PERMANENT: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    8: "THERE_IS_NO_COLUMN",
    10: "NOT_FOUND_COLUMN_IN_BLOCK",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    20: "NUMBER_OF_COLUMNS_DOESNT_MATCH",
    25: "CANNOT_PARSE_ESCAPE_SEQUENCE",
    26: "CANNOT_PARSE_QUOTED_STRING",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    33: "CANNOT_READ_ALL_DATA",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    53: "TYPE_MISMATCH",
    62: "SYNTAX_ERROR",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    73: "UNKNOWN_FORMAT",
    117: "INCORRECT_DATA",
    128: "TOO_LARGE_ARRAY_SIZE",
    131: "TOO_LARGE_STRING_SIZE",
    190: "SIZES_OF_ARRAYS_DONT_MATCH",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
    469: "VIOLATED_CONSTRAINT",
}

# Attempts for a code in neither table before it is treated as permanent.
UNKNOWN_CODE_ATTEMPTS = 5

_CODE_RE = re.compile(r"Code:\s*(\d+)")
_REPEATED_PREFIX = re.compile(r"(Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+")
_TEMP_FILE = re.compile(r"\s*\(in file/uri [^)]*\)|\s*While executing [A-Za-z]+(?::|\.)?|"
                        r":?\s*data for INSERT was parsed from file\.?")


def clean_message(text: str) -> str:
    """ClickHouse's message without what only confuses a reader: a repeated ``Code: N.
    DB::Exception:`` prefix, the temporary file the embedded engine read, executor stage names."""
    text = " ".join(text.split())
    text = _REPEATED_PREFIX.sub(r"\1", text)
    text = _TEMP_FILE.sub("", text)
    text = re.sub(r"[\s:]+\(([A-Z][A-Z_]+)\)", r" (\1)", text)  # colons the removals left before (NAME)
    return text.strip()


class Kind(enum.Enum):
    RETRY = "retry"
    HOLD = "hold"
    POISON = "poison"


@dataclass(frozen=True)
class InsertFailure:
    kind: Kind
    code: int | None
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind is not Kind.POISON

    @property
    def name(self) -> str:
        if self.code is None:
            return "NETWORK" if self.kind is Kind.RETRY else "CLIENT"
        return error_name(self.code)


def error_name(code: int) -> str:
    return RETRYABLE.get(code) or HOLD.get(code) or PERMANENT.get(code) or f"CODE_{code}"


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return code
    return code_in(str(exc))


def code_in(text: str) -> int | None:
    """The ClickHouse error code a message names (``Code: 60. DB::Exception: …``), or None."""
    m = _CODE_RE.search(text)
    return int(m.group(1)) if m else None


def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    # clickhouse-connect wraps transport failures in OperationalError (PEP 249).
    return any(cls.__name__ == "OperationalError" for cls in type(exc).__mro__)


def classify(exc: BaseException, attempt: int = 1) -> InsertFailure:
    """Sorts an insert failure into retryable or permanent.

    ``attempt`` counts from 1; it matters only for codes in neither table.
    """
    message = clean_message(str(exc))[:2000] or type(exc).__name__
    code = error_code(exc)
    unknown = Kind.RETRY if attempt < UNKNOWN_CODE_ATTEMPTS else Kind.POISON
    if code is None:
        if _is_transport_error(exc):
            # No answer at all (refused, reset, timed out): the server may be fine in a moment.
            return InsertFailure(Kind.RETRY, None, message)
        return InsertFailure(unknown, None, message)
    if code in RETRYABLE:
        return InsertFailure(Kind.RETRY, code, message)
    if code in HOLD:
        return InsertFailure(Kind.HOLD, code, message)
    if code in PERMANENT:
        return InsertFailure(Kind.POISON, code, message)
    return InsertFailure(unknown, code, message)


# ----- what an operator reads: the startup checks, write refusals and held tables say the same ------

def missing_database(database: str) -> str:
    return (f"database {database!r} does not exist in ClickHouse: create it (CREATE DATABASE "
            f"{quote_identifier(database)}) or fix --database")


def missing_table(database: str, table: str) -> str:
    return (f"table {table!r} does not exist in database {database!r}: create it first "
            "(the buffer never creates tables)")


def bad_credentials(user: str) -> str:
    return (f"ClickHouse rejected the credentials of user {user or 'default'!r}: check --clickhouse-user and the "
            "password (--clickhouse-password-file, INGEST_BUFFER_CLICKHOUSE_PASSWORD or the URL)")


def held_advice(failure: InsertFailure, database: str, table: str, user: str) -> str:
    """What is wrong and what fixes it, for a table whose batches are held."""
    code = failure.code
    if code == 81:
        return missing_database(database)
    if code in (60, 218):
        return missing_table(database, table)
    if code in (192, 193, 194, 195, 516):
        return bad_credentials(user)
    if code in (497, 291):
        return (f"user {user or 'default'!r} may not insert into {database}.{table}: GRANT INSERT ON "
                f"{quote_identifier(database)}.{quote_identifier(table)} TO {quote_identifier(user or 'default')}")
    if code == 164:
        return f"user {user or 'default'!r} is read-only (its readonly setting): give the buffer a user that may insert"
    return f"ClickHouse refuses inserts into {database}.{table} ({failure.name}): {failure.message[:200]}"


def quote_identifier(name: str) -> str:
    """Backtick-quotes an identifier, so a client string can never become SQL."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
