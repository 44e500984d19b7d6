"""The README stays true: its commands are what CI runs, and it lists every setting and metric."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from buffer.app import App
from buffer.config import SETTINGS, load
from buffer.inserter import Held
from buffer.ledger import Outcome, Reason
from tests.fakes import MemorySink

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README, re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    first, second = shell_blocks()[:2]
    assert "ingest-buffer demo" in first and "[chdb]" in first
    assert "pytest" in second
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()
    assert ci[-1] == second, ".ci/run must run exactly the README's test command"


def test_every_setting_is_documented() -> None:
    for s in SETTINGS:
        assert f"`{s.flag}` | `{s.env}`" in README, f"{s.flag} is missing from the README's settings table"


def test_documented_metrics_exist(tmp_path: Path) -> None:
    async def exported() -> set[str]:
        app = App(load({"tables": "t", "wal_dir": str(tmp_path / "wal")}, env={}), sink=MemorySink(), signals=())
        ledger, fl = app.ledger, app.flusher
        ledger.refuse("truncated", 10)
        ledger.fail(Outcome(Reason.DROPPED_OLDEST), 1)
        ledger.fail(Outcome(Reason.DEAD_LETTERED, "CANNOT_PARSE_TEXT"), 1)
        fl.stats.errors["NETWORK"] = 1
        fl.held["t"] = Held("t", "UNKNOWN_TABLE", "create it", 0.0)
        for h in (app.telemetry.flush_duration, app.telemetry.batch_rows, app.telemetry.batch_bytes,
                  app.telemetry.drain_duration, app.telemetry.wal_fsync_duration, app.telemetry.wal_group_size):
            h.record(1)
        text = app.telemetry.prometheus_text().decode()
        return {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line.startswith("ingest_buffer")}

    names = asyncio.run(exported())
    bases = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    documented = set(re.findall(r"`(ingest_buffer_[a-z_]+)[`{]", README))
    assert documented, "the README lists no metrics"
    missing = {d for d in documented if d not in bases and d not in names}
    assert not missing, f"documented but not exported: {missing}"
