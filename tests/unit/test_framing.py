"""Request checks: each malformed request gets its precise status and an actionable message."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.framing import RequestError, check_request

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
    ({"payload": b"x" * 1001}, grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 1000 bytes"),
    ({"payload": b'{"a":1}\n{"a":'}, grpc.StatusCode.INVALID_ARGUMENT, "looks truncated"),
    ({"row_count": 2}, grpc.StatusCode.INVALID_ARGUMENT, "only 1 lines"),
    ({"fmt": pb.FORMAT_ROW_BINARY, "payload": b"\x01\x02"}, grpc.StatusCode.INVALID_ARGUMENT,
     "row_count is required"),
    ({"payload": b"{}\n" * 51}, grpc.StatusCode.INVALID_ARGUMENT, "more than the whole buffer"),
])
def test_bad_requests(kwargs: dict[str, object], code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(RequestError) as info:
        check(**kwargs)  # type: ignore[arg-type]
    assert info.value.code == code
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
    with pytest.raises(RequestError, match="truncated"):
        check(payload=payload)
