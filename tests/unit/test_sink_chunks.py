"""The embedded sink writes a batch's parts to chDB's input file without joining large ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from buffer.sink import file_chunks


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=60), st.integers(1, 100))
def test_file_chunks_keep_order_copy_only_small_parts_and_write_few_chunks(parts: list[bytes], size: int) -> None:
    out = list(file_chunks(parts, size))
    assert b"".join(out) == b"".join(parts)
    large = [p for p in parts if len(p) >= size]
    # Large parts pass through as the very same objects (no copy of a big request).
    assert [c for c in out if any(c is p for p in large)] == large
    # Everything else is a run of small parts joined until it reaches the chunk size; only the
    # run before a large part, or the last one, may stay shorter.
    joined = [i for i, c in enumerate(out) if not any(c is p for p in large)]
    for i in joined:
        followed_by_large = i + 1 < len(out) and any(out[i + 1] is p for p in large)
        assert len(out[i]) >= size or followed_by_large or i == len(out) - 1


def test_one_row_requests_go_out_in_writes_of_about_64_kib() -> None:
    parts = [b'{"id":%d}\n' % i for i in range(20_000)]
    out = list(file_chunks(parts))
    assert b"".join(out) == b"".join(parts)
    assert len(out) > 2 and all(64 * 1024 <= len(c) < 64 * 1024 + 16 for c in out[:-1])
