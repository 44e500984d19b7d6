"""Shared fixtures: a real ClickHouse (embedded chDB, or CLICKHOUSE_TEST_URL) and a running buffer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from buffer.app import App
from buffer.config import load
from buffer.sink import quote_identifier

ROOT = Path(__file__).resolve().parents[1]


def dev_tool(name: str) -> str:
    """A command-line tool from the dev extra: the venv's own, else the PATH's; fails clearly if absent."""
    import shutil

    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ClickHouse:
    """The test's view of ClickHouse: a database of its own, and a client to look inside."""

    def __init__(self, url: str, database: str, client: Any) -> None:
        self.url = url
        self.database = database
        self.client = client

    def command(self, sql: str) -> Any:
        return self.client.command(sql)

    def count(self, table: str) -> int:
        return int(self.client.command(f"SELECT count() FROM {quote_identifier(self.database)}.{table}"))

    def create(self, table: str, columns: str = "id UInt64, s String", dedup_window: int = 1000) -> str:
        self.command(f"CREATE TABLE {quote_identifier(self.database)}.{table} ({columns}) ENGINE = MergeTree "
                     f"ORDER BY tuple() SETTINGS non_replicated_deduplication_window = {dedup_window}")
        return table


class HttpEndpoint:
    """tests/clickhouse_http.py in its own process: ClickHouse over HTTP, backed by chDB."""

    def __init__(self, path: Path, user: str | None = None, tls: tuple[Path, Path] | None = None,
                 port: int = 0) -> None:
        args = [sys.executable, "-m", "tests.clickhouse_http", "--path", str(path), "--port", str(port)]
        if user:
            args += ["--user", user]
        if tls:
            args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the ClickHouse HTTP endpoint did not start: {err}")
        self.port = int(json.loads(line)["listening"])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        import ssl
        import urllib.request

        context = ssl._create_unverified_context() if self.url.startswith("https") else None
        with urllib.request.urlopen(self.url + "/__stats", timeout=5, context=context) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def query(self, sql: str) -> list[list[Any]]:
        """Runs SQL over HTTP; the rows of its result (JSONCompact), none for a statement."""
        import urllib.request

        req = urllib.request.Request(self.url + "/?default_format=JSONCompact", data=sql.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body)["data"] if body.strip() else []  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def http_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpEndpoint]:
    endpoint = HttpEndpoint(tmp_path_factory.mktemp("chdb-http"))
    yield endpoint
    endpoint.stop()


def _clickhouse_params() -> list[str]:
    return ["server"] if os.environ.get("CLICKHOUSE_TEST_URL") else ["embedded", "http"]


@pytest.fixture(scope="session", params=_clickhouse_params())
def clickhouse_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where the integration tests' ClickHouse is: each test runs once per backend.

    * embedded: chDB in this process (one engine path per process, so the tests share it and each
      keeps to a database of its own);
    * http: the production path, clickhouse-connect over HTTP to tests/clickhouse_http.py;
    * server: CLICKHOUSE_TEST_URL, a real ClickHouse server, instead of both.
    """
    if request.param == "server":
        return os.environ["CLICKHOUSE_TEST_URL"]
    if request.param == "http":
        endpoint: HttpEndpoint = request.getfixturevalue("http_endpoint")
        return endpoint.url
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@contextlib.contextmanager
def open_clickhouse(url: str) -> Iterator[ClickHouse]:
    """A database of the test's own on the ClickHouse at ``url``, dropped afterwards."""
    import clickhouse_connect

    from buffer.config import clickhouse_target

    target = clickhouse_target(url)
    if target.embedded_path is not None:
        client = clickhouse_connect.get_client(dsn="chdb://" + target.embedded_path)
    else:
        client = clickhouse_connect.get_client(interface=target.interface, host=target.host, port=target.port,
                                               username=target.username, password=target.password)
    database = f"test_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {database}")
    try:
        yield ClickHouse(url, database, client)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


@pytest.fixture
def clickhouse(clickhouse_url: str) -> Iterator[ClickHouse]:
    with open_clickhouse(clickhouse_url) as ch:
        yield ch


class Running:
    def __init__(self, app: App, channel: aio.Channel, task: asyncio.Task[int]) -> None:
        self.app = app
        self.channel = channel
        self.task = task
        self.exit_code: int | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.app.admin.port}"

    @property
    def target(self) -> str:
        return str(self.app.grpc.bound)

    async def flush(self) -> None:
        """The Flush barrier: every row the buffer holds reached ClickHouse (or failed)."""
        from buffer.api import ingest_pb2 as pb
        from buffer.api import ingest_pb2_grpc as pb_grpc

        await pb_grpc.IngestServiceStub(self.channel).Flush(pb.FlushRequest())


@pytest.fixture
async def start_buffer(clickhouse: ClickHouse, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts the real buffer in this process on free ports; stops it (by draining) afterwards."""
    stack = contextlib.AsyncExitStack()

    async def start(**settings: Any) -> Running:
        flags = {"clickhouse_url": clickhouse.url, "database": clickhouse.database,
                 "grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "drain_timeout": "10s",
                 "linger": "0s", "propagation_delay": "0s", "dead_letter_dir": str(tmp_path / "dead-letters"),
                 # Without the log unless a test asks for it (--wal-dir): what these tests check of
                 # memory bounds and --when-full is the buffer without a disk behind it.
                 "wal_dir": "",
                 **{k: str(v) for k, v in settings.items()}}
        app = App(load(flags, env={}), signals=())
        task = asyncio.create_task(app.run())
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while not app.ready():
            if task.done():
                raise RuntimeError(f"buffer exited during start with {task.result()}")
            assert loop.time() < end, "buffer did not become ready"
            await asyncio.sleep(0.01)
        target = app.grpc.bound
        channel = aio.insecure_channel(target)
        running = Running(app, channel, task)

        async def stop() -> None:
            await channel.close()
            if not task.done():
                app.stop()
            running.exit_code = await asyncio.wait_for(task, 30)

        stack.push_async_callback(stop)
        return running

    async with stack:
        yield start


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    return tmp_path
