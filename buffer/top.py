"""`ingest-buffer top`: a live view of one buffer or several, from their ``GET /status`` (JSON).

Once a second it reads each buffer's status, takes rows/s from the difference of two readings, and
draws one panel per buffer with rich: its state, how full it is against its caps, rows in and out,
insert latency, retries and errors, rows lost, dropped or dead-lettered, the write-ahead log, and per
table the rows held, the oldest row's age and the last error. A buffer that does not answer is shown
as down and read again on the next tick, so a restart shows as down, then back. ``q`` or Ctrl-C
ends it. A URL whose host name has several addresses (a headless Kubernetes Service) is one panel
per address.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

RESOLVE_EVERY = 10  # ticks between looking up the names again
REQUIRED = frozenset({"state", "mode", "version", "uptime_seconds", "time_unix", "buffer", "rows", "inserts",
                      "wal", "tables"})
STATE_STYLE = {"serving": "bold green", "draining": "bold yellow", "refusing": "bold red", "starting": "yellow",
               "stopped": "red"}


@dataclass
class Target:
    """One buffer: what it said last, and the reading before (for rates)."""

    url: str
    status: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    error: str = ""
    down_since: float | None = None
    rates: dict[str, float] = field(default_factory=dict)

    def read(self, timeout: float = 0.9) -> None:
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + "/status", timeout=timeout) as r:
                status = json.loads(r.read())
            if not isinstance(status, dict) or not status.keys() >= REQUIRED:
                raise ValueError("its /status is not an ingest-buffer's (is this the admin listener's port?)")
        except (OSError, ValueError) as exc:
            self.error = str(getattr(exc, "reason", exc))
            self.down_since = self.down_since or time.time()
            self.status = None  # the next answer starts afresh: no rate across the gap
            return
        self._take(status)

    def _take(self, status: dict[str, Any]) -> None:
        self.error, self.down_since = "", None
        self.previous, self.status = self.status, status
        if self.previous is not None and self.previous.get("uptime_seconds", 0) <= status["uptime_seconds"]:
            dt = max(1e-3, status["time_unix"] - self.previous["time_unix"])
            self.rates = {k: max(0.0, (status["rows"][k] - self.previous["rows"][k]) / dt)
                          for k in ("accepted", "committed")}
        else:
            self.rates = {}


def expand(urls: list[str]) -> list[str]:
    """Each URL, or one per address when its host name has several (a headless Service's endpoints).
    Raises ValueError for a URL that is not one."""
    out: list[str] = []
    for url in urls:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 8481  # .port raises for a bad one
        path = parts.path.rstrip("/")
        try:
            if host == "localhost" or _is_address(host):
                raise OSError("one buffer")
            addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except OSError:
            addresses = [host]
        named = [host] if len(addresses) <= 1 else addresses
        out.extend(f"{parts.scheme}://{f'[{a}]' if ':' in a else a}:{port}{path}" for a in named)
    return out


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _fill(label: str, value: float, cap: float, text: str) -> Table:
    row = Table.grid(padding=(0, 1))
    row.add_column(width=6)
    row.add_column(width=30)
    row.add_column()
    share = value / cap if cap else 0.0
    style = "red" if share >= 0.8 else "yellow" if share >= 0.5 else "green"
    row.add_row(label, ProgressBar(total=max(cap, 1), completed=min(value, cap), width=30, complete_style=style),
                f"{text} ({share:.0%})")
    return row


def panel(target: Target) -> Panel:
    """One buffer's panel (a pure function of what it said: the tests render it)."""
    try:
        return _panel(target)
    except (KeyError, TypeError, ValueError) as exc:  # a status of another shape (another version)
        return Panel(Text(f"cannot show its /status: {exc!r}", style="bold red"), title=target.url,
                     border_style="red")


def _panel(target: Target) -> Panel:
    if target.error or target.status is None:
        since = f" for {time.time() - target.down_since:.0f}s" if target.down_since else ""
        return Panel(Text(f"down{since}: {target.error or 'no answer yet'} — retrying every second", style="bold red"),
                     title=target.url, border_style="red")
    s = target.status
    buf, rows, ins = s["buffer"], s["rows"], s["inserts"]
    parts: list[Any] = []
    parts.append(Text.assemble((s["state"], STATE_STYLE.get(s["state"], "")),
                               f"  ({s['mode']}, up {s['uptime_seconds']:.0f}s, ingest-buffer {s['version']})"))
    parts.append(_fill("bytes", buf["bytes"], buf["max_bytes"], f"{_size(buf['bytes'])} of {_size(buf['max_bytes'])}"))
    parts.append(_fill("rows", buf["rows"], buf["max_rows"], f"{buf['rows']:,} of {buf['max_rows']:,}"))
    rate_in, rate_out = target.rates.get("accepted"), target.rates.get("committed")
    rates = "—" if rate_in is None or rate_out is None else f"{rate_in:,.0f} in, {rate_out:,.0f} out"
    p50, p99 = ins["recent_seconds_p50"], ins["recent_seconds_p99"]
    latency = "—" if p50 is None else f"{p50 * 1000:.0f}/{p99 * 1000:.0f} ms p50/p99"
    parts.append(Text(f"rows/s {rates}   oldest row {buf['oldest_row_seconds']:.1f}s   inserts {latency}"))
    errors = ", ".join(f"{name} {n:,}" for name, n in sorted(ins["errors"].items(), key=lambda kv: -kv[1]))
    parts.append(Text(f"retries {ins['retries']:,}   errors {errors or 'none'}",
                      style="red" if ins["last_error"] else ""))
    if ins["last_error"]:
        parts.append(Text(f"last error: {ins['last_error']}", style="red", no_wrap=True, overflow="ellipsis"))
    bad = rows["lost"] or rows["dropped"]
    parts.append(Text(f"rows lost {rows['lost']:,}   dropped {rows['dropped']:,}   dead-lettered "
                      f"{rows['dead_lettered']:,}   committed {rows['committed']:,}",
                      style="bold red" if bad else ""))
    if s["wal"] is not None:
        wal = s["wal"]
        parts.append(Text(f"log {_size(wal['disk_bytes'])} of {_size(wal['max_bytes'])}   rows on disk only "
                          f"{wal['rows_on_disk_only']:,}"))
    if s["tables"]:
        tables = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("table", "rows held", "bytes", "oldest", "last error"):
            tables.add_column(column, justify="right" if column in ("rows held", "bytes", "oldest") else "left")
        for name, t in s["tables"].items():
            problem = f"held: {t['held']['error']}" if t["held"] else t["last_error"] or ""
            tables.add_row(name, f"{t['rows']:,}", _size(t["bytes"]), f"{t['oldest_row_seconds']:.1f}s",
                           Text(problem, style="red" if problem else "", no_wrap=True, overflow="ellipsis"))
        parts.append(tables)
    return Panel(Group(*parts), title=target.url, border_style=STATE_STYLE.get(s["state"], "white").split()[-1])


def screen(targets: list[Target]) -> Group:
    return Group(*(panel(t) for t in targets), Text("q or Ctrl-C to quit", style="dim"))


@contextlib.contextmanager
def _keys() -> Iterator[None]:
    """stdin in cbreak mode (a key is read without Enter), restored on the way out."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(wait: float) -> bool:
    if not sys.stdin.isatty():
        time.sleep(wait)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], wait)
    return bool(ready) and sys.stdin.read(1).lower() == "q"


def run(urls: list[str], interval: float = 1.0, console: Console | None = None) -> int:
    try:
        targets = [Target(u) for u in expand(urls)]
    except ValueError as exc:
        print(f"ingest-buffer top: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print("ingest-buffer top: give a buffer's admin URL with --url", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=16) as pool, _keys():
        try:
            with Live(screen(targets), console=console, screen=False, auto_refresh=False) as live:
                for tick in itertools.count(1):
                    if tick % RESOLVE_EVERY == 0:  # a Service's pods come and go with their addresses
                        known = {t.url: t for t in targets}
                        with contextlib.suppress(ValueError):
                            targets = [known.get(u) or Target(u) for u in expand(urls)] or targets
                    list(pool.map(lambda t: t.read(min(0.9, interval)), targets))
                    live.update(screen(targets), refresh=True)
                    if _quit_pressed(interval):
                        return 0
        except KeyboardInterrupt:
            return 0
    return 0
