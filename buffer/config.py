"""Settings: one table drives the command-line flags, the environment variables and the config file.

Precedence, highest first: command-line flag, environment variable ``INGEST_BUFFER_<NAME>``,
config file (``--config``, TOML, keys spelled like the flags with ``_`` or ``-``), default.
Everything is validated once, at start, and each error names the setting and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ENV_PREFIX = "INGEST_BUFFER_"
MODES = ("sidecar", "gateway")
WHEN_FULL = ("block", "reject", "drop_oldest")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a value the buffer cannot run with; the message says which and how to fix it."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "ki": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mi": 1024**2, "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gi": 1024**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """``64MiB``, ``512k``, ``1048576`` → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 1048576, 512KiB or 64MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """``250ms``, ``5s``, ``1.5`` (seconds), ``2m`` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration; write e.g. 250ms, 5s or 2m")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("grpc_listen", "127.0.0.1:50051",
            "gRPC listen address: HOST:PORT, [::]:PORT, or unix:/path/to.sock"),
    Setting("http_listen", "127.0.0.1:8481",
            "HTTP admin listen address (probes, /drain, /metrics): HOST:PORT"),
    Setting("clickhouse_http_listen", "",
            "ClickHouse HTTP interface listen address, HOST:PORT (off when empty): ClickHouse clients insert "
            "through the buffer by pointing at it; on a non-loopback address --clickhouse-http-auth must not be none"),
    Setting("clickhouse_http_auth", "none",
            "who may use the ClickHouse HTTP interface: none (anyone who reaches it: loopback only), clickhouse "
            "(the client's ClickHouse user and password, checked against ClickHouse and remembered for 60 s), "
            "users-file (the users in --clickhouse-http-users-file)", choices=("none", "clickhouse", "users-file")),
    Setting("clickhouse_http_reads", "forward",
            "read queries on the ClickHouse HTTP interface: forward (to ClickHouse, with the client's own "
            "credentials) or off (refused; what clients ask when they connect is still answered). The embedded "
            "engine runs them in this process either way", choices=("forward", "off")),
    Setting("clickhouse_http_users_file", "",
            "with --clickhouse-http-auth users-file: lines of user:password or user:sha256:HEX (a mounted Secret)"),
    Setting("clickhouse_url", "chdb://.ingest-buffer/chdb",
            "ClickHouse: http(s)://user:pass@host:port/db for a server (several replicas: comma-separated, "
            "with failover), chdb:///abs/path or chdb://relative/path for the embedded engine", secret=True),
    Setting("clickhouse_user", "", "ClickHouse user (default: from the URL, else 'default')"),
    Setting("clickhouse_password", "", "ClickHouse password (default: from the URL)", secret=True),
    Setting("clickhouse_password_file", "",
            "file holding the ClickHouse password (a mounted Kubernetes Secret); trailing newline ignored"),
    Setting("clickhouse_ca_file", "", "CA bundle to verify a https:// ClickHouse server's certificate"),
    Setting("clickhouse_compression", "lz4", "compression of insert bodies sent to a server",
            choices=("lz4", "zstd", "gzip", "none")),
    Setting("database", "",
            "database for the tables; overrides the one in the URL (default: from the URL, else 'default')"),
    Setting("tables", (), "comma-separated allowlist of tables; empty = any existing table", parse_list),
    Setting("mode", "sidecar", "sidecar (keep accepting until SIGTERM) or gateway (refuse after a delay)",
            choices=MODES),
    Setting("buffer_max_bytes", 64 * 1024**2, "buffer capacity in bytes, in-flight batches included",
            parse_size),
    Setting("buffer_max_rows", 1_000_000, "buffer capacity in rows, in-flight batches included", parse_int),
    Setting("when_full", "block", "what a write meets when the buffer is full", choices=WHEN_FULL),
    Setting("block_timeout", 5.0, "with when_full=block: the longest a write waits for room", parse_duration),
    Setting("max_request_bytes", 16 * 1024**2, "largest payload one request may carry", parse_size),
    Setting("flush_max_rows", 100_000, "flush a table's batch once it holds this many rows; also the most one "
            "insert carries", parse_int),
    Setting("flush_max_bytes", 16 * 1024**2,
            "flush a table's batch once it holds this many bytes; also the most one insert carries", parse_size),
    Setting("flush_interval", 1.0, "flush a table's batch once its oldest row is this old", parse_duration),
    Setting("flush_concurrency", 2,
            "tables with an insert running at once; a table with a backlog of full batches also uses idle "
            "slots, so its batches may commit out of order (1 keeps each table's inserts in order)", parse_int),
    Setting("insert_timeout", 30.0, "time limit of one insert to a ClickHouse server", parse_duration),
    Setting("retry_initial_backoff", 0.2, "first wait before retrying a failed insert", parse_duration),
    Setting("retry_max_backoff", 10.0, "longest wait between retries of a failed insert", parse_duration),
    Setting("drain_timeout", 25.0,
            "from the first drain signal (/drain or SIGTERM) to exit; keep it below the pod's "
            "terminationGracePeriodSeconds", parse_duration),
    Setting("propagation_delay", 5.0,
            "gateway mode: after /drain, keep accepting this long so load balancers stop routing here",
            parse_duration),
    Setting("linger", 2.0,
            "sidecar mode: after SIGTERM, keep accepting this long for old-style sidecars' siblings",
            parse_duration),
    Setting("dead_letter_dir", ".ingest-buffer/dead-letters",
            "directory for rows ClickHouse refuses for good (JSON lines with the error and the raw rows)"),
    Setting("dead_letter_table", "",
            "also a ClickHouse table for refused rows (schema in the README); files stay the fallback"),
    Setting("dead_letter_max_bytes", 1024**3,
            "size bound of the dead-letter directory; past it the oldest file goes (counted as lost)", parse_size),
    Setting("wal_dir", ".ingest-buffer/wal",
            "write-ahead log directory: every accepted row goes to disk, DURABLE acks wait for its fsync, rows "
            "that find memory full wait there, and what was not flushed comes back after a crash or restart; "
            "empty = no log (rows in memory only)"),
    Setting("wal_max_bytes", 1024**3, "disk bound of the write-ahead log; past it, writes are refused as full",
            parse_size),
    Setting("wal_sync_interval", 0.1, "the longest a BUFFERED row waits in the page cache for its fsync",
            parse_duration),
    Setting("wal_segment_bytes", 16 * 1024**2, "size at which the log starts a new segment file (a start reads "
            "one segment at a time into memory)", parse_size),
    Setting("event_loop", "auto", "asyncio event loop: uvloop (faster gRPC handling), asyncio, or auto "
            "(uvloop when installed)", choices=("auto", "uvloop", "asyncio")),
    Setting("log_level", "info", "log level", choices=LOG_LEVELS),
    Setting("log_format", "auto", "log format: json, text, or auto (json when not on a terminal)",
            choices=LOG_FORMATS),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    grpc_listen: str
    http_listen: str
    clickhouse_http_listen: str
    clickhouse_http_auth: str
    clickhouse_http_reads: str
    clickhouse_http_users_file: str
    clickhouse_url: str
    clickhouse_user: str
    clickhouse_password: str
    clickhouse_password_file: str
    clickhouse_ca_file: str
    clickhouse_compression: str
    database: str
    tables: tuple[str, ...]
    mode: str
    buffer_max_bytes: int
    buffer_max_rows: int
    when_full: str
    block_timeout: float
    max_request_bytes: int
    flush_max_rows: int
    flush_max_bytes: int
    flush_interval: float
    flush_concurrency: int
    insert_timeout: float
    retry_initial_backoff: float
    retry_max_backoff: float
    drain_timeout: float
    propagation_delay: float
    linger: float
    dead_letter_dir: str
    dead_letter_table: str
    dead_letter_max_bytes: int
    wal_dir: str
    wal_max_bytes: int
    wal_sync_interval: float
    wal_segment_bytes: int
    event_loop: str
    log_level: str
    log_format: str
    # What the operator should hear about at start but that does not stop it (unknown variables).
    warnings: tuple[str, ...] = ()

    @property
    def is_embedded(self) -> bool:
        return self.clickhouse_url.startswith("chdb:")

    def effective_database(self) -> str:
        if self.database:
            return self.database
        if not self.is_embedded:
            path = urlsplit(self.clickhouse_url.split(",")[0].strip()).path.strip("/")
            if path:
                return path
        return "default"

    def targets(self) -> list[ClickHouseTarget]:
        """The ClickHouse endpoints, with credentials from the settings over those in the URLs."""
        out = []
        for url in self.clickhouse_url.split(","):
            t = clickhouse_target(url.strip())
            if t.embedded_path is None:
                password = self.clickhouse_password or t.password
                if self.clickhouse_password_file:
                    password = Path(self.clickhouse_password_file).read_text().rstrip("\r\n")
                t = dataclasses.replace(t, username=self.clickhouse_user or t.username, password=password)
            out.append(t)
        return out

    def masked(self) -> dict[str, Any]:
        """The effective config with secrets (URL passwords) masked, for printing."""
        out: dict[str, Any] = {}
        for s in SETTINGS:
            value = getattr(self, s.name)
            if s.name == "clickhouse_url":
                value = ",".join(mask_url(u.strip()) for u in value.split(","))
            elif s.secret and value:
                value = "***"
            out[s.name] = list(value) if isinstance(value, tuple) else value
        return out


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; an absent flag stays None so env and file can fill it."""
    parser.add_argument("--config", metavar="FILE", default=os.environ.get(ENV_PREFIX + "CONFIG"),
                        help=f"TOML file with settings (env {ENV_PREFIX}CONFIG)")
    for s in SETTINGS:
        extra = f" one of {', '.join(s.choices)};" if s.choices else ""
        default = shown_default(s)
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(),
                            help=f"{s.help};{extra} env {s.env}; default {default or '(empty)'}")


def load(flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
         config_file: str | None = None) -> Config:
    """Builds and validates the config. Raises ConfigError listing every bad setting."""
    env = os.environ if env is None else env
    file_values = _read_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    errors: list[str] = []
    for s in SETTINGS:
        raw: Any
        source: str
        if flags.get(s.name) is not None:
            raw, source = flags[s.name], s.flag
        elif s.env in env:
            raw, source = env[s.env], s.env
        elif s.name in file_values:
            raw, source = file_values[s.name], f"{s.name} in {config_file}"
        else:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = _coerce(s, raw)
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg = Config(**values, warnings=tuple(unknown_variables(env)))
    _validate(cfg)
    return cfg


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each INGEST_BUFFER_* variable that is no setting (a typo is ignored otherwise)."""
    import difflib

    known = {s.env for s in SETTINGS} | {ENV_PREFIX + "CONFIG"}
    out = []
    for name in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"environment variable {name} is not a setting{hint}; it is ignored. Settings: "
                   "ingest-buffer serve --help")
    return out


def _coerce(s: Setting, raw: Any) -> Any:
    if isinstance(raw, list) and isinstance(s.default, tuple):
        value: Any = tuple(str(v) for v in raw)
    elif isinstance(raw, bool) or (not isinstance(raw, (str, int, float))):
        raise ValueError(f"expected a string or number, got {raw!r}")
    elif isinstance(raw, (int, float)) and not isinstance(s.default, (str, tuple)):
        value = raw if isinstance(s.default, float) else int(raw)
    else:
        value = s.parse(str(raw))
    if s.choices and value not in s.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(s.choices)}")
    return value


def _read_file(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist; give the path of a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in SETTINGS_BY_NAME:
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"--config: {path} has unknown settings {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(SETTINGS_BY_NAME)}")
    return out


_POSITIVE = ("buffer_max_bytes", "buffer_max_rows", "max_request_bytes", "flush_max_rows", "flush_max_bytes",
             "flush_interval", "insert_timeout", "retry_initial_backoff", "retry_max_backoff", "drain_timeout",
             "dead_letter_max_bytes", "flush_concurrency", "wal_max_bytes", "wal_sync_interval", "wal_segment_bytes")


def _validate(cfg: Config) -> None:
    errors: list[str] = []

    def bad(name: str, why: str) -> None:
        errors.append(f"{SETTINGS_BY_NAME[name].flag} ({SETTINGS_BY_NAME[name].env}): {why}")

    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            bad(name, "must be greater than 0")
    for name in ("block_timeout", "propagation_delay", "linger"):
        if getattr(cfg, name) < 0:
            bad(name, "must not be negative")
    if cfg.max_request_bytes > cfg.buffer_max_bytes:
        bad("max_request_bytes", f"{cfg.max_request_bytes} is larger than --buffer-max-bytes "
            f"{cfg.buffer_max_bytes}: such a request could never fit; lower it or raise the buffer")
    if cfg.flush_max_bytes > cfg.buffer_max_bytes:
        bad("flush_max_bytes", "is larger than --buffer-max-bytes; a batch can never reach it")
    if cfg.retry_max_backoff < cfg.retry_initial_backoff:
        bad("retry_max_backoff", "is smaller than --retry-initial-backoff")
    for name in ("grpc_listen", "http_listen"):
        try:
            target = parse_listen(getattr(cfg, name), allow_unix=name == "grpc_listen")
            if isinstance(target, str) and not os.path.isdir(os.path.dirname(target) or "."):
                bad(name, f"the directory of the socket, {os.path.dirname(target)}, does not exist: create it "
                          "(in Kubernetes: mount a shared emptyDir there)")
        except ValueError as exc:
            bad(name, str(exc))
    if cfg.clickhouse_http_listen:
        try:
            address = parse_listen(cfg.clickhouse_http_listen)
            host = address[0] if isinstance(address, tuple) else address
            if not _loopback(host) and cfg.clickhouse_http_auth == "none":
                bad("clickhouse_http_listen", f"{host} is not a loopback address, and --clickhouse-http-auth is none: "
                    "anyone who reaches it could insert. Listen on 127.0.0.1 (the sidecar shape), or set "
                    "--clickhouse-http-auth clickhouse or users-file")
        except ValueError as exc:
            bad("clickhouse_http_listen", str(exc))
    if cfg.clickhouse_http_auth == "clickhouse" and cfg.is_embedded:
        bad("clickhouse_http_auth", "the embedded engine has no users to check against: use users-file")
    if cfg.clickhouse_http_auth == "users-file":
        try:
            if not read_users(cfg.clickhouse_http_users_file):
                bad("clickhouse_http_users_file", f"{cfg.clickhouse_http_users_file} names no user")
        except (OSError, ValueError) as exc:
            bad("clickhouse_http_users_file", f"{exc}: --clickhouse-http-auth users-file needs a file of "
                "user:password or user:sha256:HEX lines")
    urls = [u.strip() for u in cfg.clickhouse_url.split(",")]
    try:
        kinds = {clickhouse_target(u).embedded_path is None for u in urls}
        if len(urls) > 1 and False in kinds:
            bad("clickhouse_url", "the embedded engine (chdb://) takes one path, not a list of endpoints")
    except ValueError as exc:
        bad("clickhouse_url", str(exc))
    if cfg.clickhouse_password_file and not os.path.isfile(cfg.clickhouse_password_file):
        bad("clickhouse_password_file", f"{cfg.clickhouse_password_file} does not exist or is not a file")
    if cfg.clickhouse_ca_file and not os.path.isfile(cfg.clickhouse_ca_file):
        bad("clickhouse_ca_file", f"{cfg.clickhouse_ca_file} does not exist or is not a file")
    for table in cfg.tables:
        if not valid_table_name(table):
            bad("tables", f"{table!r} is not a table name (letters, digits, _ and $; not starting with a digit)")
    if cfg.dead_letter_table and not valid_table_name(cfg.dead_letter_table):
        bad("dead_letter_table", f"{cfg.dead_letter_table!r} is not a table name")
    if cfg.database and not valid_table_name(cfg.database):
        bad("database", f"{cfg.database!r} is not a database name")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,254}")


def valid_table_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def read_users(path: str) -> dict[str, bytes]:
    """--clickhouse-http-users-file: user → SHA-256 of the password, from lines of user:password or
    user:sha256:HEX (blank lines and # comments skipped). Raises ValueError naming the bad line."""
    digests: dict[str, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, secret = line.partition(":")
            if not sep or not user:
                raise ValueError(f"{path}, line {number}: expected user:password or user:sha256:HEX")
            kind, _, digest = secret.partition(":")
            if kind == "sha256" and re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                digests[user] = bytes.fromhex(digest)
            else:
                digests[user] = hashlib.sha256(secret.encode()).digest()
    return digests


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(address: str, allow_unix: bool = False) -> tuple[str, int] | str:
    """HOST:PORT → (host, port); unix:/path → '/path'. Raises ValueError with the accepted forms."""
    if address.startswith("unix:"):
        if not allow_unix:
            raise ValueError(f"{address!r}: a Unix socket is not supported here; use HOST:PORT")
        path = address[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{address!r}: give the socket path, e.g. unix:/run/ingest/grpc.sock")
        return path
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:50051, [::]:50051"
                         + (", unix:/path/grpc.sock" if allow_unix else "") + ")")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class ClickHouseTarget:
    """Where the rows go: an embedded chDB path, or a server's connection parameters."""

    embedded_path: str | None = None
    interface: str = "http"
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = ""
    database: str = ""


def clickhouse_target(url: str) -> ClickHouseTarget:
    if url.startswith("chdb:"):
        rest = url[len("chdb:"):]
        if rest.startswith("//"):
            rest = rest[2:]
        if rest in ("", "memory", ":memory:"):
            return ClickHouseTarget(embedded_path=":memory:")
        return ClickHouseTarget(embedded_path=os.path.abspath(rest))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: use http(s)://user:pass@host:port/db for a server or "
                         "chdb:///abs/path for the embedded engine")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    try:
        port = parts.port or (8443 if parts.scheme == "https" else 8123)
    except ValueError:
        raise ValueError(f"{url!r} has a port that is not a number") from None
    from urllib.parse import unquote
    return ClickHouseTarget(interface=parts.scheme, host=parts.hostname, port=port,
                            username=unquote(parts.username or "default"),
                            password=unquote(parts.password or ""),
                            database=parts.path.strip("/"))


def shown_default(s: Setting) -> str:
    """A setting's default as an operator would write it: 64MiB, 1s, a,b."""
    d: Any = ",".join(s.default) if isinstance(s.default, tuple) else s.default
    if s.parse is parse_size:
        d = f"{d // 1024**3}GiB" if d % 1024**3 == 0 else f"{d // 1024**2}MiB" if d % 1024**2 == 0 else d
    elif isinstance(d, float):
        d = f"{d:g}s"
    return str(d)


def settings_markdown() -> str:
    """The README's settings table: ``python -c 'import buffer.config as c; print(c.settings_markdown())'``."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        d = shown_default(s)
        shown = f"`{d}`" if d != "" else "(empty)"
        meaning = s.help + (f" ({' / '.join(s.choices)})" if s.choices else "")
        rows.append(f"| `{s.flag}` | `{s.env}` | {shown} | {meaning} |")
    return "\n".join(rows)
