"""The gRPC API from a second language: examples/node/client.js (@grpc/grpc-js) batches rows and sends
keyed Writes to a real buffer; every row lands once, and a resend of a batch is answered as a duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ClickHouse

EXAMPLE = ROOT / "examples" / "node"
ROWS = 5000
BATCH_ROWS = 500  # client.js's default batch size


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: the Node.js example needs Node.js and npm")
    return path


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/node's dependencies, installed from its package.json outside the repository."""
    tool("node")
    npm = tool("npm")
    where = tmp_path_factory.mktemp("node-example")
    shutil.copy(EXAMPLE / "package.json", where / "package.json")
    started = time.monotonic()
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=where,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("npm install did not finish in 300 s")
    assert done.returncode == 0, f"npm install failed:\n{done.stderr}"
    print(f"npm install took {time.monotonic() - started:.1f} s")
    return where / "node_modules"


async def run_client(node_modules: Path, target: str, table: str, rows: int, *flags: str) -> dict[str, int]:
    """Runs client.js in place (the proto resolves beside it) with its packages from ``node_modules``."""
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    proc = await asyncio.create_subprocess_exec(tool("node"), str(EXAMPLE / "client.js"), target, table, str(rows),
                                                *flags, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"client.js exited with {proc.returncode}: {err.decode()}"
    lines = out.decode().splitlines()
    assert len(lines) == 1, f"client.js printed {lines!r}"
    stats: dict[str, int] = json.loads(lines[0])
    return stats


def distinct(clickhouse: ClickHouse, table: str = "t") -> int:
    return int(clickhouse.command(f"SELECT uniqExact(id) FROM {clickhouse.database}.{table}"))


async def test_node_client_lands_every_row_once(clickhouse: ClickHouse, start_buffer: Callable[..., Any],
                                                node_modules: Path) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stats = await run_client(node_modules, buf.target, "t", ROWS)
    assert stats["written"] == stats["acknowledged"] == ROWS
    assert stats["batches"] == ROWS // BATCH_ROWS and stats["duplicates"] == 0
    await buf.flush()
    assert clickhouse.count("t") == ROWS and distinct(clickhouse) == ROWS


async def test_node_client_resend_with_the_same_key_is_a_duplicate(clickhouse: ClickHouse,
                                                                  start_buffer: Callable[..., Any],
                                                                  node_modules: Path) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stats = await run_client(node_modules, buf.target, "t", ROWS, "--resend-once")
    assert stats["written"] == stats["acknowledged"] == ROWS
    assert stats["duplicates"] >= 1, "the first batch, sent again with its sequence, is answered as a duplicate"
    await buf.flush()
    assert clickhouse.count("t") == ROWS and distinct(clickhouse) == ROWS
