"""The client installs and imports without the server's dependencies (clickhouse-connect, OpenTelemetry)."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

from tests.conftest import ROOT

SERVER_ONLY = ("clickhouse_connect", "opentelemetry", "chdb", "prometheus_client", "uvloop", "crc32c")
PROBE = ("import json, sys; from buffer.client import AsyncClient, Client; "
         f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r})))")


def test_importing_the_client_pulls_in_no_server_module() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_pip_install_gives_the_client_with_only_grpcio_protobuf_and_orjson(tmp_path: Path) -> None:
    """A fresh virtualenv, the package installed from this tree as an application would (no extra):
    what pip brought in, and that the client imports and refuses a bad row with its own message."""
    env = tmp_path / "app-env"
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True,
                            text=True).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert {"grpcio", "protobuf", "orjson", "ingest-buffer"} <= names
    assert names - {"grpcio", "protobuf", "orjson", "ingest-buffer", "pip", "setuptools", "typing-extensions"} == set()
    probe = PROBE + "; c = Client('127.0.0.1:9'); print(c.write('t', {'id': 1}).done()); c.close(0.1)"
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "False"]
    serve = subprocess.run([str(env / "bin" / "ingest-buffer"), "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "pip install 'ingest-buffer[server]'" in serve.stderr
