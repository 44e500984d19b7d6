"""Where rows that ClickHouse refuses for good go: local files, rotated and bounded.

One JSON object per line and per refused piece: when, table, format, ClickHouse error code, name
and message, row count, the deduplication token of the batch, and the raw bytes (as text when
they are UTF-8, else base64) — enough to fix the data and replay it with ``ingest-buffer send``.
Files rotate at ``max_file_bytes``; when the directory grows past ``max_total_bytes`` the oldest
file is deleted and its rows are logged and reported (``write`` returns those this process wrote, for
its ledger; an earlier run's are logged), so the store never fills the disk and never loses rows
silently. Synchronous: it runs in the flusher's worker threads.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    table: str
    format: str
    code: int | None
    error: str
    message: str
    rows: int
    token: str
    payload: bytes


class DeadLetterStore(Protocol):
    def write(self, letters: list[DeadLetter]) -> int:
        """Stores the letters durably or raises; returns the rows of older letters deleted to make room."""


class FileDeadLetters:
    PREFIX = "dead-letters-"

    def __init__(self, directory: str, max_file_bytes: int = 64 * 1024**2, max_total_bytes: int = 1024**3) -> None:
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._mine: set[Path] = set()  # files this process wrote: their rows are in its ledger
        # In file names: a container's process is PID 1 at every restart, so the PID would not tell runs apart.
        self._run = uuid.uuid4().hex[:8]
        self._seq = 0

    def write(self, letters: list[DeadLetter]) -> int:
        lines = [self._encode(letter) for letter in letters]
        data = b"".join(lines)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._file_for(len(data))
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._enforce_total()

    @staticmethod
    def _encode(letter: DeadLetter) -> bytes:
        record: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "table": letter.table,
            "format": letter.format, "code": letter.code, "error": letter.error, "message": letter.message,
            "rows": letter.rows, "token": letter.token,
        }
        try:
            record["data"] = letter.payload.decode("utf-8")
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(letter.payload).decode()
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()

    def _file_for(self, size: int) -> Path:
        cur = self._current
        if cur is None or not cur.exists() or cur.stat().st_size + size > self.max_file_bytes:
            self._seq += 1
            cur = self.directory / f"{self.PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{self._run}-{self._seq}.jsonl"
            self._current = cur
            self._mine.add(cur)
        return cur

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"{self.PREFIX}*.jsonl"), key=lambda p: p.stat().st_mtime)

    def _enforce_total(self) -> int:
        files = self.files()
        total = sum(p.stat().st_size for p in files)
        deleted = 0
        while total > self.max_total_bytes and len(files) > 1:
            oldest = files.pop(0)
            rows = 0
            with open(oldest, "rb") as f:
                for line in f:
                    try:
                        rows += int(json.loads(line).get("rows", 0))
                    except (ValueError, AttributeError):
                        continue
            total -= oldest.stat().st_size
            oldest.unlink()
            mine = oldest in self._mine
            self._mine.discard(oldest)
            deleted += rows if mine else 0
            log.error("dead-letter store over %d bytes: deleted %s with %d rows%s; they are lost",
                      self.max_total_bytes, oldest.name, rows, "" if mine else " (written by an earlier run)",
                      extra={"rows_lost": rows})
        return deleted


TABLE_SCHEMA = """CREATE TABLE {name} (
    ts DateTime64(3) DEFAULT now64(3),
    `table` String,
    format LowCardinality(String),
    code Int32,
    error LowCardinality(String),
    message String,
    rows UInt64,
    token String,
    data String,
    data_is_base64 Bool
) ENGINE = MergeTree ORDER BY ts"""


class TableDeadLetters:
    """Dead letters as rows of a ClickHouse table (schema: TABLE_SCHEMA); files when that fails.

    Writing the letters of a batch is itself an insert with a deterministic token, so a retry
    never stores them twice. If ClickHouse refuses or cannot be reached, the letters go to the
    file store instead: they are never dropped for want of a table.
    """

    def __init__(self, insert: Callable[[str, str, bytes, str], object], table: str,
                 fallback: FileDeadLetters) -> None:
        self.insert = insert
        self.table = table
        self.fallback = fallback

    def write(self, letters: list[DeadLetter]) -> int:
        lines = []
        for letter in letters:
            try:
                data, b64 = letter.payload.decode("utf-8"), False
            except UnicodeDecodeError:
                data, b64 = base64.b64encode(letter.payload).decode(), True
            lines.append(json.dumps({"table": letter.table, "format": letter.format, "code": letter.code or 0,
                                     "error": letter.error, "message": letter.message, "rows": letter.rows,
                                     "token": letter.token, "data": data, "data_is_base64": b64}) + "\n")
        token = f"dead-letters-{letters[0].token}-{len(letters)}-{sum(len(x.payload) for x in letters)}"
        try:
            self.insert(self.table, "JSONEachRow", "".join(lines).encode(), token)
            return 0
        except Exception as exc:
            log.error("could not write %d dead letters to table %s (%s); writing them to %s instead",
                      len(letters), self.table, str(exc)[:300], self.fallback.directory)
            return self.fallback.write(letters)
