"""The production image: hadolint, then a real build on a private dockerd, and runs of the result.

Slow (a cold run takes minutes: debootstrap, then the build's pip install from the index) and needs
root to install docker.io and debootstrap when they are missing; select or deselect with ``-m image``.
Every container is removed and dockerd stopped by its PID at the end; only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from buffer import __version__
from buffer.ledger import EXIT_KEPT_IN_LOG
from tests.conftest import dev_tool, free_port
from tests.image.daemon import Dockerd, base_image, debootstrap_rootfs, dockerd, ensure_tools, run

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "ingest-buffer-base:test"
IMAGE_TAG = "ingest-buffer:test"
USER_ID = 10001
# Measured: the venv is ~68 MB (with chdb it would be ~600 MB); the test image, on a debootstrap
# base (Debian minbase with python3, python3-venv and python3-pip: ~191 MB), ~259 MB. On
# python:3.11-slim-bookworm (~130 MB) the image is smaller.
MAX_VENV_MB = 120
MAX_IMAGE_MB = 350
STOP_GRACE = 30  # docker stop -t: more than the default --drain-timeout (25s)


# --- without Docker ----------------------------------------------------------------------------------


def test_hadolint() -> None:
    out = run([dev_tool("hadolint"), "--failure-threshold", "error", "Dockerfile"], timeout=60, check=False,
              cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_version_label_default_is_the_package_version() -> None:
    m = re.search(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert m is not None, "the Dockerfile has no ARG VERSION=<default>"
    assert m.group(1) == __version__


# --- fixtures: the daemon, the base, the image ---------------------------------------------------------


@pytest.fixture(scope="module")
def docker() -> Iterator[Dockerd]:
    tools = ensure_tools()
    with dockerd(tools) as daemon:
        yield daemon


@dataclass(frozen=True)
class Image:
    tag: str
    context_bytes: float  # what the builder reported sending


def _context_bytes(build_output: str) -> float:
    m = re.search(r"Sending build context to Docker daemon\s+([\d.]+)\s*([kMG]?B)", build_output)
    assert m is not None, build_output[:2000]
    return float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]


@pytest.fixture(scope="module")
def image(docker: Dockerd) -> Image:
    started = time.monotonic()
    rootfs, key, cached = debootstrap_rootfs(docker.tools)
    took = time.monotonic() - started
    print(f"\n[image] debootstrap base {rootfs}: {'from the cache' if cached else 'built'} in {took:.1f}s")

    started = time.monotonic()
    left_out = base_image(docker, rootfs, key, BASE_TAG)
    print(f"[image] imported the base as {BASE_TAG} in {time.monotonic() - started:.1f}s")
    if left_out:
        print(f"[image] pip settings not carried into the build (local directories): {', '.join(left_out)}")

    revision = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], timeout=30, check=False).stdout.strip()
    started = time.monotonic()
    out = docker.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_TAG}",
                        "--build-arg", f"VERSION={__version__}", "--build-arg", f"REVISION={revision or 'unknown'}",
                        "-t", IMAGE_TAG, "-f", str(ROOT / "Dockerfile"), str(ROOT), timeout=1200)
    print(f"[image] docker build of {IMAGE_TAG} took {time.monotonic() - started:.1f}s")
    return Image(IMAGE_TAG, _context_bytes(out.stdout + out.stderr))


def inspect(docker: Dockerd, kind: str, name: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker.docker(kind, "inspect", name, timeout=30).stdout)
    return data[0]


# --- a running buffer ------------------------------------------------------------------------------


@dataclass
class Buffer:
    docker: Dockerd
    id: str
    grpc_port: int
    http_port: int

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def logs(self) -> str:
        out = self.docker.docker("logs", self.id, timeout=30, check=False)
        return out.stdout + out.stderr

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = inspect(self.docker, "container", self.id)["State"]
        return state

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < end:
            if not self.state()["Running"]:
                raise AssertionError(f"the container exited: {self.state()}\n{self.logs()}")
            for path in ("/livez", "/readyz"):
                try:
                    last[path] = self.get(path, timeout=2)[0]
                except OSError as exc:
                    last[path] = repr(exc)
            if last == {"/livez": 200, "/readyz": 200}:
                return
            time.sleep(0.2)
        raise AssertionError(f"not live and ready within {timeout}s: {last}\n{self.logs()}")

    def stop(self) -> tuple[int, float]:
        """docker stop (SIGTERM, SIGKILL after STOP_GRACE): the exit code and the seconds it took."""
        started = time.monotonic()
        self.docker.docker("stop", "-t", str(STOP_GRACE), self.id, timeout=STOP_GRACE + 30)
        took = time.monotonic() - started
        return int(self.state()["ExitCode"]), took


@contextlib.contextmanager
def run_buffer(docker: Dockerd, image: Image, volume: Path, **env: str) -> Iterator[Buffer]:
    """The image as in production: read-only root, no capabilities, the volume, on 127.0.0.1 only."""
    if os.geteuid() == 0:
        os.chown(volume, USER_ID, USER_ID)  # as a pod's fsGroup would
    else:
        volume.chmod(0o777)
    grpc_port, http_port = free_port(), free_port()
    settings = {"INGEST_BUFFER_CLICKHOUSE_URL": "http://127.0.0.1:1/", "INGEST_BUFFER_TABLES": "events",
                "INGEST_BUFFER_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
                "INGEST_BUFFER_HTTP_LISTEN": f"127.0.0.1:{http_port}", **env}
    name = f"ingest-buffer-test-{uuid.uuid4().hex[:8]}"
    args = ["run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", f"{volume}:/var/lib/ingest-buffer"]
    for key, value in settings.items():
        args += ["-e", f"{key}={value}"]
    try:
        docker.docker(*args, image.tag, timeout=60)
        yield Buffer(docker, name, grpc_port, http_port)
    finally:
        docker.docker("rm", "-f", "-v", name, timeout=60, check=False)


@pytest.fixture(scope="module")
def buffer(docker: Dockerd, image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buffer]:
    with run_buffer(docker, image, tmp_path_factory.mktemp("volume")) as b:
        b.wait_ready()
        yield b


def run_image(docker: Dockerd, image: Image, *args: str, entrypoint: str | None = None) -> str:
    """A one-off container: read-only, no network, removed afterwards (with its anonymous volume)."""
    flags = ["--entrypoint", entrypoint] if entrypoint else []
    out = docker.docker("run", "--rm", "--read-only", "--network", "none", *flags, image.tag, *args, timeout=120)
    return out.stdout + out.stderr


# --- the image -----------------------------------------------------------------------------------------


def test_image_size_and_metadata(docker: Dockerd, image: Image) -> None:
    data = inspect(docker, "image", image.tag)
    size_mb = data["Size"] / 1e6
    print(f"\n[image] {image.tag}: {size_mb:.0f} MB")
    assert size_mb < MAX_IMAGE_MB, f"the image is {size_mb:.0f} MB, over {MAX_IMAGE_MB} MB"

    config = data["Config"]
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert config["Entrypoint"] == ["ingest-buffer"]
    assert config["Cmd"] == ["serve"]
    assert set(config["ExposedPorts"]) == {"50051/tcp", "8481/tcp"}
    assert set(config["Volumes"]) == {"/var/lib/ingest-buffer"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["INGEST_BUFFER_GRPC_LISTEN"] == "0.0.0.0:50051"
    assert env["INGEST_BUFFER_HTTP_LISTEN"] == "0.0.0.0:8481"
    assert env["INGEST_BUFFER_DEAD_LETTER_DIR"] == "/var/lib/ingest-buffer/dead-letters"
    assert env["INGEST_BUFFER_WAL_DIR"] == "/var/lib/ingest-buffer/wal"
    assert env["INGEST_BUFFER_LOG_FORMAT"] == "json"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "ingest-buffer"
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_version(docker: Dockerd, image: Image) -> None:
    assert run_image(docker, image, "--version").strip() == f"ingest-buffer {__version__}"


def test_no_embedded_engine(docker: Dockerd, image: Image) -> None:
    script = ("import importlib.metadata as m, importlib.util as u, json, os, sys\n"
              "names = sorted(d.metadata['Name'].lower() for d in m.distributions())\n"
              "size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(sys.prefix) for f in fs)\n"
              "print(json.dumps({'chdb_module': u.find_spec('chdb') is not None, 'names': names,\n"
              "                  'prefix': sys.prefix, 'venv_bytes': size}))\n")
    found = json.loads(run_image(docker, image, "-c", script, entrypoint="python3"))
    print(f"\n[image] the venv {found['prefix']}: {found['venv_bytes'] / 1e6:.0f} MB")
    assert found["prefix"] == "/opt/ingest-buffer"
    assert found["venv_bytes"] / 1e6 < MAX_VENV_MB
    assert not found["chdb_module"]
    assert not [n for n in found["names"] if n.startswith("chdb")], found["names"]
    assert "ingest-buffer" in found["names"] and "clickhouse-connect" in found["names"]


def test_anonymous_volume_is_writable_by_the_user(docker: Dockerd, image: Image) -> None:
    """Without a mount, Docker fills the volume from the image: the directory the Dockerfile chowned."""
    script = ("import os\n"
              "d = os.environ['INGEST_BUFFER_DEAD_LETTER_DIR']\n"
              "os.makedirs(d, exist_ok=True)\n"
              "open(os.path.join(d, 'probe'), 'w').write('x')\n"
              "print(os.getuid(), os.stat(d).st_uid)\n")
    assert run_image(docker, image, "-c", script, entrypoint="python3").split() == [str(USER_ID), str(USER_ID)]


# --- the running buffer ---------------------------------------------------------------------------------


def test_runs_as_non_root_on_a_read_only_root(buffer: Buffer) -> None:
    pid = int(buffer.state()["Pid"])
    uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:"))
    assert uids == [str(USER_ID)] * 4, uids
    assert "ingest-buffer" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert buffer.docker.docker("exec", buffer.id, "id", "-u", timeout=30).stdout.strip() == str(USER_ID)

    script = ("import os\n"
              "try:\n"
              "    open('/opt/ingest-buffer/probe', 'w')\n"
              "    print('writable')\n"
              "except OSError as e:\n"
              "    print(os.strerror(e.errno))\n"
              "d = os.environ['INGEST_BUFFER_DEAD_LETTER_DIR']\n"
              "os.makedirs(d, exist_ok=True)\n"
              "p = os.path.join(d, 'probe')\n"
              "open(p, 'w').write('x')\n"
              "os.remove(p)\n"
              "print('volume writable')\n")
    out = buffer.docker.docker("exec", buffer.id, "python3", "-c", script, timeout=30).stdout.splitlines()
    assert out == ["Read-only file system", "volume writable"], out


def test_probes_and_metrics(buffer: Buffer) -> None:
    assert buffer.get("/livez")[0] == 200
    assert buffer.get("/readyz")[0] == 200
    status, body = buffer.get("/metrics")
    assert status == 200
    metrics = [line for line in body.splitlines() if line.startswith("ingest_buffer_")]
    assert metrics, body[:2000]
    assert any(line.startswith("ingest_buffer_enabled") for line in metrics), metrics


def test_grpc_health_serving(buffer: Buffer) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{buffer.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_logs_are_json(buffer: Buffer) -> None:
    lines = [line for line in buffer.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_sigterm_with_nothing_buffered_exits_0(docker: Dockerd, image: Image, tmp_path: Path) -> None:
    with run_buffer(docker, image, tmp_path) as b:
        b.wait_ready()
        code, took = b.stop()
        print(f"\n[image] docker stop: exit {code} after {took:.1f}s")
        assert code == 0, b.logs()
        assert took < STOP_GRACE, f"took {took:.1f}s: SIGKILLed?\n{b.logs()}"
        assert not b.state()["OOMKilled"]


@pytest.mark.parametrize("wal", [True, False], ids=["log-on", "log-off"])
def test_sigterm_with_unflushed_rows_keeps_them_in_the_log_or_exits_3(docker: Dockerd, image: Image, tmp_path: Path,
                                                                      wal: bool) -> None:
    """ClickHouse is unreachable: the rows stay buffered and the drain deadline passes. With the log (the
    image's default) they stay in it on the volume: exit 4; without it, exit 3 with a count."""
    import grpc

    from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
    from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
    from buffer.wal import describe

    env = {"INGEST_BUFFER_DRAIN_TIMEOUT": "2s", "INGEST_BUFFER_LINGER": "0s",
           **({} if wal else {"INGEST_BUFFER_WAL_DIR": ""})}
    with run_buffer(docker, image, tmp_path, **env) as b:
        b.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
            pb_grpc.IngestServiceStub(channel).Write(  # type: ignore[no-untyped-call]
                pb.WriteRequest(table="events", format=pb.FORMAT_JSON_EACH_ROW, rows=b'{"id":1}\n{"id":2}\n'),
                timeout=10)
        code, took = b.stop()
        print(f"\n[image] docker stop with 2 rows buffered, log {'on' if wal else 'off'}: exit {code} after "
              f"{took:.1f}s")
        logs = b.logs()
        assert took < STOP_GRACE, logs
        if wal:
            assert code == EXIT_KEPT_IN_LOG, logs
            assert "stay in the write-ahead log (/var/lib/ingest-buffer/wal)" in logs, logs
            assert describe(tmp_path / "wal")["unsettled"]["rows"] == 2, "on the volume, for the next container"
        else:
            assert code == 3, logs
            assert "rows_not_flushed" in logs, logs


def test_final_stage_holds_only_the_venv(docker: Dockerd, image: Image) -> None:
    """The final stage copies the venv; it installs nothing, and the build stage's sources stay behind."""
    history = docker.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image.tag, timeout=30).stdout
    assert "pip install" not in history, history
    script = "import os; print(os.path.exists('/src'), os.path.isdir('/opt/ingest-buffer/bin'))"
    assert run_image(docker, image, "-c", script, entrypoint="python3").split() == ["False", "True"]


def test_build_context_is_small(image: Image) -> None:
    """The .dockerignore keeps .venv (GBs with chdb), .git, tests and caches out of the build context."""
    print(f"\n[image] build context: {image.context_bytes / 1e3:.0f} kB")
    assert image.context_bytes < 5e6
