"""A private Docker engine for the image tests, and a base image made without a registry.

* ``ensure_tools`` finds dockerd, the docker CLI and debootstrap, installing Debian's ``docker.io``
  and ``debootstrap`` with apt-get when they are missing (root only; otherwise the tests skip).
* ``Dockerd`` runs ``dockerd`` by hand: its own data root, exec root, socket and pidfile under a
  temporary directory, no iptables, no bridge (builds and containers use the host's network). It is
  stopped by its PID (SIGTERM, wait, SIGKILL) and its directory removed.
* ``debootstrap_rootfs`` makes a Debian bookworm root filesystem with python3 from the mirror this
  machine's apt already uses, cached under /tmp/ingest-buffer-image-cache by a hash of the inputs.
* ``base_image`` imports it and adds this machine's pip configuration (files, the CA bundle and the
  PIP_* environment), so ``pip install`` inside the build reaches the index the way pip does here.
  The base is test-only; the Dockerfile itself stays generic.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("INGEST_BUFFER_IMAGE_CACHE", "/tmp/ingest-buffer-image-cache"))
SUITE = "bookworm"  # the default base, python:3.11-slim-bookworm, is Debian 12 with Python 3.11
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,python3-pip,ca-certificates"
CACHE_SCHEMA = "1"  # bump to invalidate every cached root filesystem
SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/local/sbin:/usr/sbin:/sbin"


def tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def run(cmd: Sequence[str], timeout: float, check: bool = True, env: dict[str, str] | None = None,
        input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a command to completion within ``timeout`` seconds; on failure, fails with its output."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, input=input,
                             cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout}s:\n{tail(exc.stdout)}\n"
                             f"{tail(exc.stderr)}") from exc
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{tail(out.stdout)}\n{tail(out.stderr)}")
    return out


# --- tools -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    dockerd: str
    docker: str
    debootstrap: str


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _docker_cli(dockerd: str) -> str | None:
    """The CLI that came with this dockerd (same prefix), else any docker on PATH."""
    here = Path(dockerd).parent
    for candidate in (here / "docker", here.parent / "bin" / "docker"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return _which("docker")


def ensure_tools() -> Tools:
    """dockerd, docker and debootstrap; installs docker.io and debootstrap with apt-get if needed."""
    if not (_which("dockerd") and _which("debootstrap") and _which("docker")):
        if os.geteuid() != 0:
            pytest.skip("the image tests need dockerd and debootstrap (apt-get install docker.io debootstrap); "
                        "they are missing and this user is not root, so they cannot be installed")
        if _which("apt-get") is None:
            pytest.skip("dockerd or debootstrap is missing and there is no apt-get to install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "docker.io", "debootstrap"]):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            except subprocess.TimeoutExpired:
                pytest.skip(f"{' '.join(cmd)} did not finish in 900s")
            if out.returncode != 0:
                pytest.skip(f"could not install docker.io and debootstrap: {' '.join(cmd)} exited "
                            f"{out.returncode}:\n{tail(out.stderr, 10)}")
    dockerd, debootstrap = _which("dockerd"), _which("debootstrap")
    docker = _docker_cli(dockerd) if dockerd else None
    if not (dockerd and docker and debootstrap):
        pytest.skip(f"still missing after apt-get: dockerd={dockerd} docker={docker} debootstrap={debootstrap}")
    return Tools(dockerd=dockerd, docker=docker, debootstrap=debootstrap)


# --- the daemon ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM dockerd if this test process dies without stopping it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not running any more.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_pid(pid: int, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL: only the given PID."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)


def remove_tree(path: Path) -> None:
    """Unmounts whatever is still mounted under ``path`` (deepest first), then deletes it."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    with contextlib.suppress(OSError):
        points = [line.split()[1].encode().decode("unicode_escape")
                  for line in Path("/proc/self/mounts").read_text().splitlines()]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


class Dockerd:
    """dockerd started by hand under ``root``; ``docker(...)`` runs the CLI against it."""

    def __init__(self, tools: Tools, root: Path) -> None:
        self.tools = tools
        self.root = root
        self.sock = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.exec_root = root / "exec"
        self.log_path = root / "dockerd.log"
        (root / "cli").mkdir()
        (root / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(root / "cli"),
                    "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        cmd = [self.tools.dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.exec_root),
               "--host", f"unix://{self.sock}", "--pidfile", str(self.pidfile),
               "--config-file", str(self.root / "daemon.json"),
               "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited {self.proc.returncode} while starting:\n{self.log()}")
            if self.sock.exists():
                out = self.docker("version", "--format", "{{.Server.Version}}", timeout=10, check=False)
                if out.returncode == 0:
                    return
            if time.monotonic() > end:
                raise AssertionError(f"dockerd did not answer within {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return tail(self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def docker(self, *args: str, timeout: float = 60, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run([self.tools.docker, *args], timeout=timeout, check=check, env=self.env, input=input)

    def stop(self) -> None:
        """Removes every container of this (private) daemon, then stops dockerd and its containerd."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                ids = self.docker("ps", "-aq", timeout=20).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, timeout=60, check=False)
        containerd_pids: list[int] = []
        for pidfile in self.exec_root.glob("containerd/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                containerd_pids.append(int(pidfile.read_text().strip()))
        _stop_pid(self.proc.pid, grace=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pid in containerd_pids:  # dockerd stops its own containerd; this is for a SIGKILLed dockerd
            if _alive(pid) and "containerd" in _cmdline(pid):
                _stop_pid(pid, grace=10)
        self.proc = None


@contextlib.contextmanager
def dockerd(tools: Tools) -> Iterator[Dockerd]:
    # A short path: the daemon's and containerd's unix sockets live under it (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="ib-dockerd-", dir="/tmp"))
    daemon = Dockerd(tools, root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        remove_tree(root)


# --- the debootstrap base --------------------------------------------------------------------------


def _sources() -> Iterator[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of every deb source in /etc/apt, one-line and deb822 formats."""
    apt = Path("/etc/apt")
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]], words[3:]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                key = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                    elif ":" in line:
                        key, value = line.split(":", 1)
                        key = key.strip().lower()
                        fields[key] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for ``SUITE`` (or any plain release suite)."""
    candidates = [(uri, suites) for uri, suites, components in _sources()
                  if uri.startswith(("http://", "https://")) and "main" in components
                  and any("-" not in s and "/" not in s for s in suites)]
    for uri, suites in candidates:
        if SUITE in suites:
            return uri
    if candidates:
        return candidates[0][0]
    pytest.skip("no Debian archive (a deb source with a release suite and main) in /etc/apt/sources.list*")


def _version(package: str) -> str:
    out = run(["dpkg-query", "-W", "-f=${Version}", package], timeout=30, check=False)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive lock on ``path`` (another test run may be filling the cache), waited for at most ``timeout``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise AssertionError(f"{path} stayed locked for {timeout}s (another test run?)") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def debootstrap_rootfs(tools: Tools, timeout: float = 1200) -> tuple[Path, str, bool]:
    """(root filesystem, cache key, whether it came from the cache)."""
    mirror = debian_mirror()
    arch = run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()
    inputs = {"schema": CACHE_SCHEMA, "suite": SUITE, "mirror": mirror, "arch": arch, "variant": "minbase",
              "include": DEBOOTSTRAP_INCLUDE, "debootstrap": _version("debootstrap")}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    final = CACHE / f"rootfs-{key}"
    with _locked(CACHE / ".lock", timeout=timeout + 300):
        if (final / ".complete").exists():
            return final, key, True
        for old in CACHE.glob("rootfs-*"):  # partial ones, and those of other inputs: one is kept
            remove_tree(old)
        work = CACHE / f"rootfs-{key}.partial-{os.getpid()}"
        try:
            run([tools.debootstrap, "--variant=minbase", f"--arch={arch}", f"--include={DEBOOTSTRAP_INCLUDE}",
                 SUITE, str(work), mirror], timeout=timeout)
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (work / leftover).glob("*"):
                    if item.is_file():
                        item.unlink()
            (work / ".complete").write_text(json.dumps(inputs, sort_keys=True) + "\n")
            work.rename(final)
        finally:
            remove_tree(work)
    return final, key, False


def _pip_settings() -> dict[str, str]:
    """This machine's effective pip settings, as ``pip config list`` prints them (files and PIP_*)."""
    out = run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False)
    settings: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^[^.]*\.([^=]+)='(.*)'$", line.strip())
        if m:
            settings[m.group(1)] = m.group(2)
    return settings


def _pip_files() -> tuple[list[Path], list[str]]:
    """Files the build's pip needs to behave like pip here; and what cannot be carried over."""
    files: list[Path] = []
    home = Path.home()
    configs = [Path("/etc/pip.conf"), home / ".config/pip/pip.conf", home / ".pip/pip.conf"]
    configs += [Path(d) / "pip/pip.conf" for d in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":") if d]
    if os.environ.get("PIP_CONFIG_FILE"):
        configs.append(Path(os.environ["PIP_CONFIG_FILE"]))
    files += [c for c in configs if c.is_file()]
    left_out: list[str] = []
    for key, value in _pip_settings().items():
        if key not in ("cert", "client-cert", "constraint", "requirement", "find-links", "index-url",
                       "extra-index-url"):
            continue
        for item in value.split():
            path = Path(item[len("file://"):] if item.startswith("file://") else item)
            if not path.is_absolute():
                continue
            if path.is_file() and path.stat().st_size < 50 * 1024**2:
                files.append(path)
            elif path.exists():
                left_out.append(f"{key}={item}")
    return files, left_out


def base_image(daemon: Dockerd, rootfs: Path, key: str, tag: str) -> list[str]:
    """Imports the root filesystem and adds this machine's pip configuration; returns what was left out."""
    plain = f"ingest-buffer-debootstrap:{key}"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "--exclude=./.complete", "-c", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        imported = subprocess.run([daemon.tools.docker, "import", "-", plain], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600, env=daemon.env)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)
    assert tar.returncode == 0, f"tar of {rootfs} failed: {tail(tar.stderr.read() if tar.stderr else b'')}"
    assert imported.returncode == 0, f"docker import failed: {imported.stderr}"

    files, left_out = _pip_files()
    home = Path.home()
    with tempfile.TemporaryDirectory(prefix="ib-base-") as tmp:
        context = Path(tmp)
        (context / "files").mkdir()
        for f in files:
            inside = Path("/root") / f.relative_to(home) if f.is_relative_to(home) else f
            target = context / "files" / inside.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        lines = [f"FROM {plain}", "COPY files/ /"]
        for name, value in sorted(os.environ.items()):
            if name.startswith("PIP_") or name.lower() in ("http_proxy", "https_proxy", "no_proxy"):
                quoted = json.dumps(value).replace("$", "\\$")
                lines.append(f"ENV {name}={quoted}")
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        daemon.docker("build", "--network", "host", "-t", tag, str(context), timeout=600)
    return left_out
