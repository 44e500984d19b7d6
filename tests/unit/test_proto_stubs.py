"""The committed stubs are exactly what proto/generate.sh makes from proto/ (nobody edits them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(ROOT / "proto/generate.sh"), str(tmp_path)], check=True,
                   env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "generate.sh produced nothing"
    for rel in generated:
        assert (ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from proto/: run proto/generate.sh and commit the result")
