"""Which ClickHouse failures are worth retrying: one table, in one place.

A failure is either *retryable* (the server, the network or the load is the problem: back off and
try again with the same deduplication token) or *permanent for this data* (the rows themselves are
wrong: retrying can never succeed). An error code in neither list is retried a few times, then
treated as permanent, so an unforeseen error can never block the queue forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# code → name, for log lines and metrics labels.
RETRYABLE: dict[int, str] = {
    3: "UNEXPECTED_END_OF_FILE",  # the request body was cut on its way
    32: "ATTEMPT_TO_READ_AFTER_EOF",
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    252: "TOO_MANY_PARTS",
    285: "TOO_FEW_LIVE_REPLICAS",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    473: "DEADLOCK_AVOIDED",
    497: "ACCESS_DENIED",  # a grant is missing: the operator fixes it, the rows are fine
    516: "AUTHENTICATION_FAILED",  # wrong credentials: likewise
    999: "KEEPER_EXCEPTION",
    1000: "POCO_EXCEPTION",
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
    60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    73: "UNKNOWN_FORMAT",
    81: "UNKNOWN_DATABASE",
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


@dataclass(frozen=True)
class InsertFailure:
    retryable: bool
    code: int | None
    message: str

    @property
    def name(self) -> str:
        if self.code is None:
            return "NETWORK" if self.retryable else "CLIENT"
        return RETRYABLE.get(self.code) or PERMANENT.get(self.code) or f"CODE_{self.code}"


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return code
    m = _CODE_RE.search(str(exc))
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
    if code is None:
        if _is_transport_error(exc):
            # No answer at all (refused, reset, timed out): the server may be fine in a moment.
            return InsertFailure(True, None, message)
        return InsertFailure(attempt < UNKNOWN_CODE_ATTEMPTS, None, message)
    if code in RETRYABLE:
        return InsertFailure(True, code, message)
    if code in PERMANENT:
        return InsertFailure(False, code, message)
    return InsertFailure(attempt < UNKNOWN_CODE_ATTEMPTS, code, message)
