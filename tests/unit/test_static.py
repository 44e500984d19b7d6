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
