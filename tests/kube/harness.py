"""A kubelet for tests: runs a pod from the chart's *rendered* spec and terminates it as Kubernetes does.

What it plays, from the spec and nothing else:
* each container is a local process started with its rendered command/args (the image's
  ENTRYPOINT, ``ingest-buffer``, maps to this checkout's ``python -m buffer``) and env (values,
  Secret references resolved from the test's secrets); mounts are per-pod temp directories, and env
  values under a mount path point into them;
* each pod has its own IP on the loopback network (127.0.0.N), as it would have its own network
  namespace: listen addresses 0.0.0.0 and 127.0.0.1 in the env become that IP;
* native sidecars (init containers with ``restartPolicy: Always``) start first, in order, each
  once its startupProbe passes; then the app containers;
* readiness probes (httpGet) are polled every ``periodSeconds``; the pod is ready when all are;
* termination: the grace period starts; with native sidecars every preStop (apps' and sidecars')
  runs at once, each app container gets SIGTERM when its own preStop returns, sidecars get SIGTERM
  only after every app container exited; without them every container gets SIGTERM after its own
  preStop; whatever is still running when the grace period ends gets SIGKILL.
Only the ClickHouse address is overridden by the test. Every process is stopped by its PID.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINTS = {"ingest-buffer": [sys.executable, "-m", "buffer"]}
_ips = itertools.count(2)

# A test may play an application container with its own program: container name → argv builder
# taking the container's resolved env.
AppPlayer = Callable[[dict[str, str]], list[str]]


def next_pod_ip() -> str:
    n = next(_ips)
    return f"127.0.{n // 250}.{n % 250 + 2}"


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    native_sidecar: bool
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    ready: bool = False
    started_at: float = 0.0
    exited_at: float | None = None
    killed: bool = False
    prestop_done: threading.Event = field(default_factory=threading.Event)

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class Pod:
    def __init__(self, name: str, pod_spec: dict[str, Any], workdir: Path, *, env_overrides: dict[str, str],
                 secrets: dict[str, dict[str, str]], players: dict[str, AppPlayer] | None = None) -> None:
        self.name = name
        self.spec = pod_spec
        self.ip = next_pod_ip()
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.secrets = secrets
        self.env_overrides = env_overrides
        self.players = players or {}
        self.grace = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        self.mounts = self._volumes()
        self.containers = [self._container(c, native=True) for c in pod_spec.get("initContainers", [])
                           if c.get("restartPolicy") == "Always"]
        self.containers += [self._container(c, native=False) for c in pod_spec["containers"]]
        self._stop_probes = threading.Event()
        self._threads: list[threading.Thread] = []
        self.terminating = False

    # ----- building containers from the spec ---------------------------------------------------

    def _volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for vol in self.spec.get("volumes", []):
            path = self.dir / "volumes" / vol["name"]
            path.mkdir(parents=True)
            if "secret" in vol:
                data = self.secrets[vol["secret"]["secretName"]]
                for item in vol["secret"].get("items", [{"key": k, "path": k} for k in data]):
                    (path / item["path"]).write_text(data[item["key"]])
            paths[vol["name"]] = path
        return paths

    def _container(self, spec: dict[str, Any], native: bool) -> Container:
        mount_map = {m["mountPath"]: self.mounts[m["name"]] for m in spec.get("volumeMounts", [])}
        env: dict[str, str] = {}
        for item in spec.get("env", []):
            if "value" in item:
                value = str(item["value"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            elif "fieldRef" in item.get("valueFrom", {}):
                field_path = item["valueFrom"]["fieldRef"]["fieldPath"]
                value = {"status.podIP": self.ip, "metadata.name": self.name}[field_path]
            else:
                raise NotImplementedError(f"env source of {item['name']}")
            env[item["name"]] = self._localize(value, mount_map)
        env.update(self.env_overrides)
        if spec["name"] in self.players:
            argv = self.players[spec["name"]](env)
        else:
            argv = self._argv(spec.get("command"), spec.get("args", []))
        return Container(spec["name"], spec, native, argv, env)

    def _localize(self, value: str, mount_map: dict[str, Path]) -> str:
        # The pod's own network and filesystem: its IP for local listen addresses, its volumes.
        value = value.replace("0.0.0.0:", f"{self.ip}:").replace("127.0.0.1:", f"{self.ip}:")
        for mount, local in sorted(mount_map.items(), key=lambda kv: -len(kv[0])):
            if mount in value:
                value = value.replace(mount, str(local))
        return value

    @staticmethod
    def _argv(command: list[str] | None, args: list[str]) -> list[str]:
        if command:
            head = ENTRYPOINTS.get(command[0], [command[0]]) + list(command[1:])
            return head + list(args)
        return ENTRYPOINTS["ingest-buffer"] + list(args)  # the image's ENTRYPOINT

    # ----- probes ------------------------------------------------------------------------------

    def _probe(self, container: Container, probe: dict[str, Any]) -> bool:
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.spec.get("ports", []) if p["name"] == port)
        try:
            with urllib.request.urlopen(f"http://{self.ip}:{port}{get['path']}",
                                        timeout=float(probe.get("timeoutSeconds", 1))) as r:
                return 200 <= r.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _poll_readiness(self, container: Container) -> None:
        probe = container.spec.get("readinessProbe")
        if probe is None:
            container.ready = True
            return
        period = float(probe.get("periodSeconds", 10))
        threshold = int(probe.get("failureThreshold", 3))
        failures = 0
        while not self._stop_probes.is_set() and container.exit_code is None:
            if self._probe(container, probe):
                failures = 0
                container.ready = True
            else:
                failures += 1
                if failures >= threshold:
                    container.ready = False
            self._stop_probes.wait(period)
        container.ready = False

    # ----- lifecycle ----------------------------------------------------------------------------

    def _spawn(self, c: Container) -> None:
        c.log_path = self.dir / f"{c.name}.log"
        with open(c.log_path, "wb") as log:
            c.proc = subprocess.Popen(c.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, **c.env})
        c.started_at = time.monotonic()
        watcher = threading.Thread(target=self._watch, args=(c,), daemon=True)
        watcher.start()
        prober = threading.Thread(target=self._poll_readiness, args=(c,), daemon=True)
        prober.start()
        self._threads += [watcher, prober]

    @staticmethod
    def _watch(c: Container) -> None:
        assert c.proc is not None
        c.proc.wait()
        c.exited_at = time.monotonic()

    def start(self, timeout: float = 60) -> None:
        for c in self.containers:
            self._spawn(c)
            if c.native_sidecar:
                probe = c.spec.get("startupProbe")
                end = time.monotonic() + timeout
                while probe is not None and not self._probe(c, probe):
                    if c.exit_code is not None or time.monotonic() > end:
                        raise RuntimeError(f"sidecar {c.name} did not start: exit {c.exit_code}\n{c.log()}")
                    time.sleep(float(probe.get("periodSeconds", 1)))

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not self.ready:
            for c in self.containers:
                if c.exit_code is not None:
                    raise RuntimeError(f"container {c.name} exited with {c.exit_code}:\n{c.log()}")
            if time.monotonic() > end:
                raise RuntimeError(f"pod {self.name} not ready in {timeout}s")
            time.sleep(0.05)

    @property
    def ready(self) -> bool:
        return not self.terminating and all(c.ready for c in self.containers)

    def _prestop(self, c: Container, deadline: float) -> None:
        hook = c.spec.get("lifecycle", {}).get("preStop")
        try:
            if hook and c.exit_code is None:
                command = hook["exec"]["command"]
                argv = ENTRYPOINTS.get(command[0], [command[0]]) + list(command[1:])
                subprocess.run(argv, cwd=ROOT, env={**os.environ, **c.env}, capture_output=True,
                               timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            c.prestop_done.set()

    def _signal(self, c: Container, sig: signal.Signals) -> None:
        if c.proc is not None and c.proc.poll() is None:
            os.kill(c.proc.pid, sig)
            if sig == signal.SIGKILL:
                c.killed = True

    def _wait_exit(self, containers: list[Container], deadline: float) -> None:
        while any(c.exit_code is None for c in containers) and time.monotonic() < deadline:
            time.sleep(0.02)

    def terminate(self) -> float:
        """Deletes the pod as the kubelet would; returns the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + self.grace
        self.terminating = True
        sidecars = [c for c in self.containers if c.native_sidecar]
        apps = [c for c in self.containers if not c.native_sidecar]

        def stop_app(c: Container) -> None:
            self._prestop(c, deadline)
            self._signal(c, signal.SIGTERM)

        hooks = [threading.Thread(target=stop_app, args=(c,)) for c in apps]
        # Native sidecars' preStop hooks run at the same time as the applications' (DESIGN.md, KEP-753).
        hooks += [threading.Thread(target=self._prestop, args=(c, deadline)) for c in sidecars]
        for h in hooks:
            h.start()
        self._wait_exit(apps, deadline)
        for c in apps:
            self._signal(c, signal.SIGKILL)
        for c in reversed(sidecars):  # only now, after every application container exited
            self._signal(c, signal.SIGTERM)
        self._wait_exit(sidecars, max(deadline, time.monotonic() + 2))
        for c in self.containers:
            self._signal(c, signal.SIGKILL)
        for h in hooks:
            h.join(5)
        self._wait_exit(self.containers, time.monotonic() + 5)
        self._stop_probes.set()
        return time.monotonic() - t0

    def kill(self) -> None:
        """Cleanup: SIGKILL by PID whatever still runs."""
        self._stop_probes.set()
        for c in self.containers:
            self._signal(c, signal.SIGKILL)
            if c.proc is not None:
                c.proc.wait(10)

    def describe(self) -> str:
        return "; ".join(f"{c.name}: {shlex.join(c.argv[:4])}… exit {c.exit_code}" for c in self.containers)


class Service:
    """The endpoints of a Service: ready pods, with a propagation lag when a pod starts terminating."""

    def __init__(self, lag: float = 0.3) -> None:
        self.pods: list[Pod] = []
        self.lag = lag
        self._removed_at: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, pod: Pod) -> None:
        with self.lock:
            self.pods.append(pod)

    def endpoints(self) -> list[Pod]:
        now = time.monotonic()
        with self.lock:
            out = []
            for pod in self.pods:
                if pod.terminating:
                    removed = self._removed_at.setdefault(pod.name, now)
                    if now - removed < self.lag:
                        out.append(pod)  # load balancers have not caught up yet
                elif pod.ready:
                    out.append(pod)
            return out
