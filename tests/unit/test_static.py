"""Static checks run with the tests, so one command checks everything: ruff, mypy, buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def test_ruff() -> None:
    paths = [p for p in ("buffer", "tests", "bench") if (ROOT / p).is_dir()]
    out = run(tool("ruff"), "check", *paths)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy() -> None:
    out = run(tool("mypy"), "buffer")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_lint() -> None:
    out = run(tool("buf"), "lint")
    assert out.returncode == 0, out.stdout + out.stderr
