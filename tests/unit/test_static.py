"""Static checks run with the tests, so one command checks everything: ruff, mypy, buf lint."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import dev_tool

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    paths = [p for p in ("buffer", "tests", "bench") if (ROOT / p).is_dir()]
    out = run(dev_tool("ruff"), "check", *paths)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy() -> None:
    out = run(dev_tool("mypy"), "buffer")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_lint() -> None:
    out = run(dev_tool("buf"), "lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_send_and_the_api_import_nothing_of_the_server() -> None:
    import sys

    code = ("import sys, buffer.send, buffer.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('clickhouse_connect', 'opentelemetry') "
            "or m in ('buffer.service', 'buffer.ring', 'buffer.app', 'buffer.server', 'buffer.flusher')))")
    out = run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
