"""`ingest-buffer send` cuts files at row boundaries only."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.send import chunks, resolve_format


@given(st.lists(st.text(alphabet="ab,\t ", max_size=30), min_size=1, max_size=50), st.integers(1, 64))
def test_chunks_reassemble_to_the_input_and_end_on_rows(lines: list[str], size: int) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    parts = list(chunks(io.BytesIO(data), size, csv=False))
    assert b"".join(p for p, _ in parts) == data
    assert all(p.endswith(b"\n") for p, _ in parts)
    assert sum(n for _, n in parts) == len(lines)


def test_csv_is_never_cut_inside_a_quoted_field() -> None:
    data = b'1,"multi\nline\nfield"\n2,"x"\n3,"y\nz"\n'
    for size in range(1, len(data) + 1):
        for part, _ in chunks(io.BytesIO(data), size, csv=True):
            assert part.count(b'"') % 2 == 0, f"cut inside quotes with chunk size {size}: {part!r}"


def test_a_missing_final_newline_is_added() -> None:
    assert list(chunks(io.BytesIO(b"a\nb"), 100, csv=False)) == [(b"a\n", 1), (b"b\n", 1)]


def test_format_resolution() -> None:
    assert resolve_format(None, "x.ndjson") == pb.FORMAT_JSON_EACH_ROW
    assert resolve_format("TabSeparated", None) == pb.FORMAT_TSV
    assert resolve_format("FORMAT_CSV", None) == pb.FORMAT_CSV
    with pytest.raises(ValueError, match="pass --format"):
        resolve_format(None, "-")
    with pytest.raises(ValueError, match="extension"):
        resolve_format(None, "x.parquet")
