"""The dead-letter store: readable records, rotation, a bound that counts what it deletes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from buffer.deadletter import DeadLetter, FileDeadLetters


def letter(payload: bytes, rows: int = 1) -> DeadLetter:
    return DeadLetter("events", "JSONEachRow", 27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "Code: 27. bad", rows,
                      "tok", payload)


def test_records_carry_the_error_and_the_raw_rows(tmp_path: Path) -> None:
    store = FileDeadLetters(str(tmp_path / "dl"))
    store.write([letter(b'{"id":"x"}\n'), letter(b"\xff\x00binary", rows=3)])
    (path,) = store.files()
    text, binary = (json.loads(line) for line in path.read_text().splitlines())
    assert text["data"] == '{"id":"x"}\n' and text["code"] == 27 and text["table"] == "events"
    assert base64.b64decode(binary["data_base64"]) == b"\xff\x00binary" and binary["rows"] == 3


def test_rotates_and_stays_bounded_counting_deleted_rows(tmp_path: Path) -> None:
    store = FileDeadLetters(str(tmp_path), max_file_bytes=1000, max_total_bytes=3000)
    deleted = sum(store.write([letter(b"x" * 200, rows=2)]) for _ in range(40))
    files = store.files()
    assert len(files) > 1
    assert sum(p.stat().st_size for p in files) <= 3000 + 1000
    kept = sum(json.loads(line)["rows"] for p in files for line in p.read_text().splitlines())
    assert deleted > 0 and kept + deleted == 80, "every row is either kept or reported deleted"


def test_an_earlier_runs_files_deleted_to_make_room_are_logged_not_put_in_this_runs_ledger(tmp_path: Path) -> None:
    earlier = FileDeadLetters(str(tmp_path), max_file_bytes=1000, max_total_bytes=10**9)
    for _ in range(10):
        earlier.write([letter(b"x" * 200, rows=2)])
    now = FileDeadLetters(str(tmp_path), max_file_bytes=1000, max_total_bytes=3000)
    deleted = sum(now.write([letter(b"y" * 200, rows=2)]) for _ in range(40))
    kept = sum(json.loads(line)["rows"] for p in now.files() for line in p.read_text().splitlines()
               if json.loads(line)["data"].startswith("y"))
    assert kept + deleted == 80, "this run's rows: kept, or reported deleted; the earlier run's are not its own"
