"""Checks one write request and works out its row count, without parsing the rows.

Line formats (JSONEachRow, JSONCompactEachRow, CSV, TabSeparated) end every row with a newline,
so a payload that does not end with one is truncated, and the number of newlines bounds the
number of rows (equal to it except for CSV fields or pretty-printed JSON with embedded
newlines). Binary formats cannot be counted without decoding, so their writers say how many rows
they send.
"""

from __future__ import annotations

import grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.config import valid_table_name

# enum value → (ClickHouse format name, is a line format)
FORMATS: dict[int, tuple[str, bool]] = {
    pb.FORMAT_JSON_EACH_ROW: ("JSONEachRow", True),
    pb.FORMAT_JSON_COMPACT_EACH_ROW: ("JSONCompactEachRow", True),
    pb.FORMAT_CSV: ("CSV", True),
    pb.FORMAT_TSV: ("TabSeparated", True),
    pb.FORMAT_ROW_BINARY: ("RowBinary", False),
    pb.FORMAT_NATIVE: ("Native", False),
}
FORMAT_NAMES = {value: pb.Format.Name(value) for value in FORMATS}


class RequestError(Exception):
    """A request the buffer refuses; carries the gRPC status and a message a developer can act on."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason  # short label for metrics
        self.trailers = trailers  # trailing metadata sent with the error
        self.counted = False  # already in the rejected-requests metric


# What check_request finds: (ClickHouse format name, rows, is a line format — its rows can be split
# apart without decoding them). A plain tuple: this runs once per request, often per row.
Checked = tuple[str, int, bool]


# Names that passed the check, so the hot path skips the pattern match (bounded: clients choose them).
_VALID_NAMES: set[str] = set()


def check_request(table: str, fmt: int, payload: bytes, row_count: int, max_bytes: int,
                  max_rows: int) -> Checked:
    """Validates framing and sizes; the table's existence is checked elsewhere."""
    if table not in _VALID_NAMES:
        if not table:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "table is empty: set it to the name of the "
                               "ClickHouse table the rows go to", "no_table")
        if not valid_table_name(table):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"table {table[:100]!r} is not a plain table name: use letters, digits, _ or $, "
                               "not starting with a digit, at most 255 characters (the database comes from "
                               "the buffer's configuration)", "bad_table_name")
        if len(_VALID_NAMES) < 1024:
            _VALID_NAMES.add(table)
    spec = FORMATS.get(fmt)
    if spec is None:
        known = ", ".join(pb.Format.Name(v) for v in FORMATS)
        what = "unset" if fmt == pb.FORMAT_UNSPECIFIED else f"unknown ({fmt})"
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"format is {what}: use one of {known}",
                           "bad_format")
    name, is_lines = spec
    size = len(payload)
    if size == 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "rows is empty: send at least one complete row",
                           "empty")
    if size > max_bytes:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"rows is {size} bytes, over the limit of {max_bytes} bytes per request: "
                           "split it into several requests (or messages of one stream)", "too_large")
    if is_lines:
        if payload[-1:] != b"\n":
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the last row does not end with a newline: the {FORMAT_NAMES[fmt]} payload "
                               "looks truncated; send complete rows, each ending with \\n", "truncated")
        lines = payload.count(b"\n")
        if row_count > lines:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"row_count is {row_count} but the payload has only {lines} lines: every "
                               f"{FORMAT_NAMES[fmt]} row ends with a newline; fix the count or the framing",
                               "row_count_mismatch")
        rows = row_count or lines
    else:
        if row_count == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"row_count is required for {FORMAT_NAMES[fmt]}: binary rows cannot be counted "
                               "without decoding them; set it to the number of rows in the payload",
                               "row_count_missing")
        rows = row_count
    if rows > max_rows:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request holds {rows} rows, more than the whole buffer ({max_rows}): "
                           "split it", "too_many_rows")
    return name, rows, is_lines
