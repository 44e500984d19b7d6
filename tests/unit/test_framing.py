"""Request checks: each malformed request gets its precise status and an actionable message."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.framing import check_request, refuse_header
from buffer.refusals import InvalidRequest
from buffer.service import STATUS

J = pb.FORMAT_JSON_EACH_ROW


def check(table: str = "t", fmt: int = J, payload: bytes = b'{"a":1}\n', row_count: int = 0) -> tuple[str, int]:
    name, rows, _ = check_request(table, fmt, payload, row_count, max_bytes=1000, max_rows=50)
    return name, rows


@pytest.mark.parametrize(("kwargs", "code", "words"), [
    ({"table": ""}, grpc.StatusCode.INVALID_ARGUMENT, "table is empty"),
    ({"table": "x; DROP TABLE y"}, grpc.StatusCode.INVALID_ARGUMENT, "not a plain table name"),
    ({"table": "db.t"}, grpc.StatusCode.INVALID_ARGUMENT, "database comes from"),
    ({"fmt": pb.FORMAT_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "format is unset"),
    ({"fmt": 99}, grpc.StatusCode.INVALID_ARGUMENT, "unknown (99)"),
    ({"payload": b""}, grpc.StatusCode.INVALID_ARGUMENT, "rows is empty"),
    ({"payload": b"x" * 1001}, grpc.StatusCode.INVALID_ARGUMENT,
     "limit of 1000 bytes per request (--max-request-bytes)"),
    ({"payload": b'{"a":1}\n{"a":'}, grpc.StatusCode.INVALID_ARGUMENT, "looks truncated"),
    ({"row_count": 2}, grpc.StatusCode.INVALID_ARGUMENT, "row_count is 2 but the payload has 1 lines"),
    ({"payload": b'{"a":1}\n{"a":2}\n', "row_count": 1}, grpc.StatusCode.INVALID_ARGUMENT, "row_count is 1"),
    ({"fmt": pb.FORMAT_ROW_BINARY, "payload": b"\x01\x02"}, grpc.StatusCode.INVALID_ARGUMENT,
     "row_count is required"),
    ({"payload": b"{}\n" * 51}, grpc.StatusCode.INVALID_ARGUMENT, "more than the whole buffer"),
])
def test_bad_requests(kwargs: dict[str, object], code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check(**kwargs)  # type: ignore[arg-type]
    assert STATUS[type(info.value)] == code
    assert words in info.value.message


def test_line_formats_count_lines() -> None:
    assert check(payload=b'{"a":1}\n{"a":2}\n') == ("JSONEachRow", 2)
    assert check(fmt=pb.FORMAT_CSV, payload=b"1,2\n3,4\n") == ("CSV", 2)
    assert check(fmt=pb.FORMAT_TSV, payload=b"1\t2\n") == ("TabSeparated", 1)


def test_row_count_may_be_lower_than_lines_for_embedded_newlines() -> None:
    assert check(fmt=pb.FORMAT_CSV, payload=b'1,"two\nlines"\n', row_count=1) == ("CSV", 1)


def test_binary_formats_take_the_stated_count() -> None:
    assert check(fmt=pb.FORMAT_NATIVE, payload=b"\x00" * 10, row_count=3) == ("Native", 3)


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), min_size=1, max_size=30))
def test_complete_rows_always_pass_and_are_counted(rows: list[bytes]) -> None:
    payload = b"".join(r + b"\n" for r in rows)
    if len(payload) <= 1000 and len(rows) <= 50:
        assert check(fmt=pb.FORMAT_TSV, payload=payload)[1] == len(rows)


@given(st.binary(min_size=1, max_size=200).filter(lambda b: not b.endswith(b"\n")))
def test_any_unterminated_payload_is_refused_as_truncated(payload: bytes) -> None:
    with pytest.raises(InvalidRequest, match="truncated"):
        check(payload=payload)


@pytest.mark.parametrize(("payload", "line", "why"), [
    (b'[{"a":1},{"a":2}]\n', 1, "it is a JSON array: send its objects, one per line"),
    (b'{"a":1}\n{\n  "a": 2\n}\n', 2, "an object spread over several lines"),
    (b'{"a":1}\n\n{"a":2}\n', 2, "it is empty"),
    (b'{"a":1}\n {"a":2}\n', 2, "it has spaces around the value"),
    (b'{"a":1}\n"x"\n', 2, "it is not a JSON object"),
])
def test_json_each_row_is_one_object_per_line_or_refused(payload: bytes, line: int, why: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check(payload=payload)
    assert info.value.reason == "not_one_row_per_line"
    assert f"line {line} of the JSONEachRow payload is not one JSON object ({why}" in info.value.message
    assert "one object per line" in info.value.message


def test_json_compact_each_row_is_one_array_per_line_or_refused() -> None:
    c = pb.FORMAT_JSON_COMPACT_EACH_ROW
    assert check(fmt=c, payload=b'[1,"a"]\n[2,"b"]\r\n') == ("JSONCompactEachRow", 2)
    with pytest.raises(InvalidRequest, match="one array per line"):
        check(fmt=c, payload=b'[[1,"a"],\n[2,"b"]]\n')


@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8),
                                                                  st.lists(st.integers(), max_size=3))),
                min_size=1, max_size=20))
def test_any_rows_serialized_one_per_line_pass_and_are_counted_exactly(rows: list[dict[str, object]]) -> None:
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    if len(payload) <= 1000:
        assert check(payload=payload)[1] == len(rows)


@given(st.lists(st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), min_size=1), min_size=1,
                max_size=10))
def test_pretty_printed_rows_are_always_refused(rows: list[dict[str, object]]) -> None:
    payload = b"".join(json.dumps(r, indent=2).encode() + b"\n" for r in rows)
    if len(payload) <= 1000:
        with pytest.raises(InvalidRequest, match="one object per line"):
            check(payload=payload)


def test_a_csv_or_tsv_header_line_is_refused_with_advice_to_drop_it() -> None:
    columns = frozenset({b"id", b"s"})
    headers = (("CSV", b'id,"s"\n1,a\n'), ("TabSeparated", b"id\ts\n1\ta\n"), ("CSV", b"s,id\r\n1,a\n"))
    for name, payload in headers:
        with pytest.raises(InvalidRequest, match=r"is a header .*drop the header line") as info:
            refuse_header(name, payload, columns)
        assert info.value.reason == "header_line"
    refuse_header("CSV", b"1,id\n", columns)  # a data row that merely holds a column name
    refuse_header("CSV", b"id,other\n", columns)  # not every field is a column
    refuse_header("CSV", b"id,id\n", columns)  # not every column is named
    refuse_header("TabSeparated", b"id,s\n", columns)  # the wrong separator: one field, not a column
