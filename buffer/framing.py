"""Checks one write request and works out its row count, without parsing the rows.

Line formats (JSONEachRow, JSONCompactEachRow, CSV, TabSeparated) end every row with a newline,
so a payload that does not end with one is truncated, and the number of newlines bounds the
number of rows. For the JSON line formats it is exact: a JSON string cannot hold a raw newline, so
when every line starts with ``{`` (``[``) and ends with ``}`` (``]``), each line is one row — and a
JSON array around the rows, or an object pretty-printed over several lines, is refused here (it
would be counted wrong, or not parse once joined to other payloads). CSV fields may hold newlines,
so a CSV writer may say it sends fewer rows than lines. The checks are byte counts (C speed), not
a Python loop per row; only a refusal looks at single lines, to say which one is wrong. Binary
formats cannot be counted without decoding, so their writers say how many rows they send.
"""

from __future__ import annotations

from buffer.api import FORMAT_NAMES, FORMATS, ingest_pb2
from buffer.config import valid_table_name
from buffer.refusals import InvalidRequest

# What check_request finds: (ClickHouse format name, rows, is a line format — its rows can be split
# apart without decoding them). A plain tuple: this runs once per request, often per row.
Checked = tuple[str, int, bool]



class _OnePerLine:
    """How a JSON line format's lines open and close, prepared for byte counts."""

    __slots__ = ("closing", "ends", "first", "kind", "opening", "starts")

    def __init__(self, opening: bytes, closing: bytes, kind: str) -> None:
        self.opening, self.closing, self.kind = opening, closing, kind
        self.first = opening[0]
        self.ends = (closing + b"\n", closing + b"\r\n")
        self.starts = b"\n" + opening


_JSON_LINES = {"JSONEachRow": _OnePerLine(b"{", b"}", "object"),
               "JSONCompactEachRow": _OnePerLine(b"[", b"]", "array")}
# Format enum value → (ClickHouse name, is a line format, the one-value-per-line rule or None).
_SPECS = {fmt: (name, lines, _JSON_LINES.get(name)) for fmt, (name, lines) in FORMATS.items()}

# Names that passed the check, so the hot path skips the pattern match (bounded: clients choose them).
_VALID_NAMES: set[str] = set()


def check_request(table: str, fmt: int, payload: bytes, row_count: int, max_bytes: int,
                  max_rows: int) -> Checked:
    """Validates framing and sizes; the table's existence is checked elsewhere."""
    if table not in _VALID_NAMES:
        _check_table_name(table)
    spec = _SPECS.get(fmt)
    if spec is None:
        known = ", ".join(ingest_pb2.Format.Name(v) for v in FORMATS)
        what = "unset" if fmt == ingest_pb2.FORMAT_UNSPECIFIED else f"unknown ({fmt})"
        raise InvalidRequest(f"format is {what}: use one of {known}", "bad_format")
    name, is_lines, json = spec
    size = len(payload)
    if size == 0:
        raise InvalidRequest("rows is empty: send at least one complete row", "empty")
    if size > max_bytes:
        raise InvalidRequest(f"rows is {size} bytes, over this buffer's limit of {max_bytes} bytes per request "
                             "(--max-request-bytes): split it into several requests (or messages of one stream)",
                             "too_large")
    if is_lines:
        if payload[-1:] != b"\n":
            raise InvalidRequest(f"the last row does not end with a newline: the {FORMAT_NAMES[fmt]} payload looks "
                                 "truncated; send complete rows, each ending with \\n", "truncated")
        lines = payload.count(b"\n")
        # One line, the common small write: two byte checks. More: three counts, no loop.
        if json is not None and (payload[0] != json.first or not payload.endswith(json.ends) or (
                lines > 1 and not _one_value_per_line(payload, lines, json))):
            raise _not_one_per_line(payload, name, json)
        if row_count > lines or (row_count and json is not None and row_count != lines):
            raise InvalidRequest(f"row_count is {row_count} but the payload has {lines} lines: every "
                                 f"{FORMAT_NAMES[fmt]} row ends with a newline; fix the count or the framing",
                                 "row_count_mismatch")
        rows = row_count or lines
    else:
        if row_count == 0:
            raise InvalidRequest(f"row_count is required for {FORMAT_NAMES[fmt]}: binary rows cannot be counted "
                                 "without decoding them; set it to the number of rows in the payload",
                                 "row_count_missing")
        rows = row_count
    if rows > max_rows:
        raise InvalidRequest(f"the request holds {rows} rows, more than the whole buffer ({max_rows}): split it",
                             "too_many_rows")
    return name, rows, is_lines


def _check_table_name(table: str) -> None:
    if not table:
        raise InvalidRequest("table is empty: set it to the name of the ClickHouse table the rows go to",
                             "no_table")
    if not valid_table_name(table):
        raise InvalidRequest(f"table {table[:100]!r} is not a plain table name: use letters, digits, _ or $, not "
                             "starting with a digit, at most 255 characters (the database comes from the buffer's "
                             "configuration)", "bad_table_name")
    if len(_VALID_NAMES) < 1024:
        _VALID_NAMES.add(table)


def _one_value_per_line(payload: bytes, lines: int, rule: _OnePerLine) -> bool:
    """Every line starts with the opening byte and ends with the closing one (given the first does)."""
    if 1 + payload.count(rule.starts) != lines:
        return False
    ends = payload.count(rule.ends[0])
    if ends != lines and b"\r" in payload:  # CRLF line ends: rare, and only then worth a third scan
        ends += payload.count(rule.ends[1])
    return ends == lines


def _not_one_per_line(payload: bytes, name: str, rule: _OnePerLine) -> InvalidRequest:
    """The refusal, naming the first line that is not one value (this path may loop: it is rare)."""
    opening, closing, kind = rule.opening, rule.closing, rule.kind
    number, why = 0, ""
    for number, raw in enumerate(payload.split(b"\n")[:-1], 1):  # noqa: B007 (the number is used below)
        line = raw.rstrip(b"\r")
        if line.startswith(opening) and line.endswith(closing):
            continue
        stripped = line.strip()
        if not stripped:
            why = "it is empty"
        elif name == "JSONEachRow" and stripped[:1] == b"[":
            why = "it is a JSON array: send its objects, one per line, without the brackets"
        elif stripped[:1] == opening and stripped[-1:] == closing:
            why = "it has spaces around the value"
        elif stripped[:1] == opening:
            why = f"an {kind} spread over several lines (pretty-printed?)"
        else:
            why = f"it is not a JSON {kind}"
        break
    return InvalidRequest(f"line {number} of the {name} payload is not one JSON {kind} ({why}): {name} takes one "
                          f"{kind} per line, each line ending with \\n — serialize each row on a line of its own",
                          "not_one_row_per_line")


def refuse_header(name: str, payload: bytes, columns: frozenset[bytes]) -> None:
    """Refuses a CSV or TabSeparated payload whose first line names the table's columns (all of them).

    The buffer joins payloads, so a header would land as a row (or be skipped by ClickHouse's
    header detection and leave the count wrong). Cheap when there is none: the first field is
    looked up before anything is split.
    """
    sep = b"," if name == "CSV" else b"\t"
    first = payload[:payload.find(b"\n")]
    cut = first.find(sep)
    if (first if cut < 0 else first[:cut]).strip(b'\r "') not in columns:
        return
    fields = [f.strip(b'\r "') for f in first.split(sep)]
    # Rows carry every column (inserts name none), so a header names every column, each once.
    if len(fields) == len(columns) and set(fields) == columns:
        raise InvalidRequest(f"the first line of the {name} payload is a header ({first[:200].decode(errors='replace')}"
                             "): send rows only — drop the header line (payloads are joined into one insert, where "
                             "a header is not a row)", "header_line")
