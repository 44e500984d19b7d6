"""Poison-row isolation with a fake insert function: what lands, what is found bad, what is left."""

from __future__ import annotations

import logging

import pytest

from buffer.errors import InsertFailure, Kind
from buffer.isolate import Piece, isolate, settle, split_rows
from buffer.ledger import Outcome, Reason
from buffer.ring import Entry

KEY = ("t", "JSONEachRow")
BAD = InsertFailure(Kind.POISON, 27, "Code: 27. cannot parse")


class FakeInsert:
    """Refuses any payload holding b"bad"; records every attempt."""

    def __init__(self, busy_after: int | None = None, skips: bytes = b"") -> None:
        self.calls: list[tuple[bytes, str, int]] = []
        self.landed: list[bytes] = []
        self.busy_after = busy_after  # from this call on, answer as a server would while the deadline comes
        self.skips = skips  # rows holding this are taken but not written (as input_format_allow_errors does)

    async def __call__(self, parts: list[bytes], token: str, rows: int) -> tuple[InsertFailure | None, int]:
        data = b"".join(parts)
        self.calls.append((data, token, rows))
        if self.busy_after is not None and len(self.calls) > self.busy_after:
            return InsertFailure(Kind.RETRY, 252, "too many parts"), 0
        if b"bad" in data:
            return BAD, 0
        self.landed.append(data)
        return None, data.count(self.skips) if self.skips else 0


def entries(*payloads: bytes) -> list[Entry]:
    out = []
    for seq, p in enumerate(payloads, 1):
        e = Entry(KEY, p, p.count(b"\n"))
        e.seq = seq
        out.append(e)
    return out


async def test_bisects_to_the_bad_rows_and_lands_the_rest_under_derived_tokens() -> None:
    batch = entries(*[b"".join(b'{"a":%d}\n' % (i * 10 + j) for j in range(10)) for i in range(8)])
    batch[5].payload = batch[5].payload.replace(b'{"a":53}', b'{"a":"bad"}')
    insert = FakeInsert()
    found = await isolate(batch, "JSONEachRow", "tok", BAD, insert, lambda: False)
    assert [p.data for p, _ in found.bad] == [b'{"a":"bad"}\n']
    assert sum(found.good.values()) == 79 and found.good[id(batch[5])] == 9 and not found.unsent
    assert sum(d.count(b"\n") for d in insert.landed) == 79
    assert all(token.startswith("tok/") for _, token, _ in insert.calls)
    assert len({token for _, token, _ in insert.calls}) == len(insert.calls), "each sub-insert its own token"
    assert len(insert.calls) < 25, "bisection, not one insert per row"


async def test_a_shared_entry_splits_by_request_first() -> None:
    (e,) = entries(b'{"a":\n0}\n')  # one row over two lines, as its writer said
    e.rows = 1
    e.extra = [(b'{"a":1}\n{"a":"bad"}\n', 2, 0)]
    e.rows += 2
    found = await isolate([e], "JSONEachRow", "tok", BAD, FakeInsert(), lambda: False)
    assert [p.data for p, _ in found.bad] == [b'{"a":"bad"}\n'] and found.good[id(e)] == 2


async def test_binary_pieces_are_never_cut() -> None:
    batch = [Entry(("t", "RowBinary"), b"\x01bad", 5), Entry(("t", "RowBinary"), b"\x02ok", 4)]
    found = await isolate(batch, "RowBinary", "tok", BAD, FakeInsert(), lambda: False)
    assert [(p.data, p.rows) for p, _ in found.bad] == [(b"\x01bad", 5)] and found.good[id(batch[1])] == 4


async def test_past_the_deadline_what_is_left_is_unsent_not_bad() -> None:
    batch = entries(b'{"a":1}\n{"a":"bad"}\n', b'{"a":2}\n', b'{"a":3}\n')
    found = await isolate(batch, "JSONEachRow", "tok", BAD, FakeInsert(busy_after=1), lambda: False)
    assert not found.bad and sum(p.rows for p in found.unsent) == 4, "retrying ran into the deadline: unsent"
    late = await isolate(batch, "JSONEachRow", "tok", BAD, FakeInsert(), lambda: True)
    assert sum(p.rows for p in late.unsent) == 4 and not late.bad and not any(late.good.values())


async def test_settle_gives_each_entry_its_outcomes_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    batch = entries(b'{"a":1}\n{"a":"bad"}\n', b'{"a":2}\n')
    found = await isolate(batch, "JSONEachRow", "tok", BAD, FakeInsert(), lambda: False)
    with caplog.at_level(logging.WARNING, logger="buffer.isolate"):
        kept = settle(KEY, batch, "tok", found, stored=True, where="/var/dl")
        lost = settle(KEY, batch, "tok", found, stored=False, where="/var/dl")
    assert kept[0][1:3] == (1, {Outcome(Reason.DEAD_LETTERED, "CANNOT_PARSE_INPUT_ASSERTION_FAILED"): 1})
    assert lost[0][2] == {Outcome(Reason.REJECTED_BY_CLICKHOUSE, "CANNOT_PARSE_INPUT_ASSERTION_FAILED"): 1}
    assert kept[1][1:3] == (1, {})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("split a batch of 3 rows for t to isolate rows ClickHouse refused: 2 landed, "
                               "1 dead-lettered to /var/dl")


async def test_rows_clickhouse_took_but_did_not_write_are_counted_as_such() -> None:
    batch = entries(b'{"a":1}\n{"a":"bad"}\n', b'{"a":"skip"}\n{"a":3}\n')
    found = await isolate(batch, "JSONEachRow", "tok", BAD, FakeInsert(skips=b"skip"), lambda: False)
    assert sum(found.good.values()) == 2 and sum(found.unwritten.values()) == 1
    settled = settle(KEY, batch, "tok", found, stored=True, where="/var/dl")
    assert sum(n for _, _, failed, _ in settled for o, n in failed.items() if o.reason is Reason.NOT_WRITTEN) == 1


def test_split_rows_never_cuts_inside_a_quoted_csv_field() -> None:
    e = Entry(("t", "CSV"), b'1,"a\nb"\n2,c\n', 2)
    assert [p.data for p in split_rows(Piece(e, e.payload, 2, "1"), "CSV")] == [b'1,"a\nb"\n', b"2,c\n"]
    odd = Piece(e, b"1\n2\n3\n", 2, "1")
    assert split_rows(odd, "CSV") == [odd], "lines are not rows here: the piece stays whole"
