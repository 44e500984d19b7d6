"""Command line: ``ingest-buffer serve | drain | check-config | send | demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from buffer import __version__
from buffer.config import ENV_PREFIX, Config, ConfigError, add_arguments, load, parse_listen

EPILOG = (f"Every setting is also read from the environment as {ENV_PREFIX}<NAME> "
          f"(e.g. {ENV_PREFIX}CLICKHOUSE_URL) and from a TOML file given with --config.")


def _config(args: argparse.Namespace) -> Config | None:
    """The validated settings, or None after printing what is wrong."""
    try:
        return load(vars(args), config_file=args.config)
    except ConfigError as exc:
        print(f"ingest-buffer: {exc}", file=sys.stderr)
        return None


def _chdb_missing(what: str) -> bool:
    """True (after saying what to install) when the embedded engine is needed but not installed."""
    import importlib.util

    if importlib.util.find_spec("chdb") is not None:
        return False
    from buffer.sink import CHDB_MISSING

    print(f"ingest-buffer: {what}: {CHDB_MISSING}", file=sys.stderr)
    return True


def _serve(args: argparse.Namespace) -> int:
    from buffer import logs
    from buffer.app import App
    from buffer.ledger import EXIT_CONFIG

    cfg = _config(args)
    if cfg is None or (cfg.is_embedded and _chdb_missing(f"--clickhouse-url {cfg.clickhouse_url}")):
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)

    async def main() -> int:
        code = await App(cfg).run()
        # Everything is settled, synced and logged now. An insert still running past the drain
        # deadline (its rows counted in doubt, or kept in the log) holds a worker thread that the
        # interpreter's exit would wait for — past the kubelet's SIGKILL, which gives a sidecar 2 s
        # after its SIGTERM at the end of the grace period. So the process ends here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    if cfg.event_loop != "asyncio":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            if cfg.event_loop == "uvloop":
                print("ingest-buffer: --event-loop uvloop: uvloop is not installed (pip install uvloop)",
                      file=sys.stderr)
                return EXIT_CONFIG
    return asyncio.run(main())


def _check_config(args: argparse.Namespace) -> int:
    """Exit 0: valid (and, with --connect, ClickHouse checked with no error); 1: with --connect,
    ClickHouse could not be checked or a check found an error; 2: invalid settings."""
    cfg = _config(args)
    if cfg is None:
        return 2
    print(json.dumps(cfg.masked(), indent=2))
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.is_embedded and _chdb_missing(f"--clickhouse-url {cfg.clickhouse_url}"):
        return 2
    if not args.connect:
        return 0
    from buffer.checks import Finding, embedded_engine_error, startup_checks
    from buffer.errors import clean_message
    from buffer.sink import ClickHouseSink

    sink = ClickHouseSink(cfg)  # reads only: creates no database, no table
    try:
        locked = embedded_engine_error(sink) if cfg.is_embedded else None
        if locked is not None:
            findings = [Finding("error", f"cannot open the embedded engine: {clean_message(locked)[:300]} (is a "
                                         "running ingest-buffer using this path?)", unchecked=True)]
        else:
            user = cfg.targets()[0].username if not cfg.is_embedded else ""
            findings = startup_checks(sink, cfg.effective_database(), cfg.tables, user)
    finally:
        sink.close()
    for f in findings:
        print(f, file=sys.stderr)
    if not findings:
        print("ClickHouse: reachable, tables and deduplication settings look right", file=sys.stderr)
    # Asked to connect, a ClickHouse that cannot be checked is a failure (serve only warns: it buffers meanwhile).
    return 1 if any(f.level == "error" or f.unchecked for f in findings) else 0


def _print_summary(summary: dict[str, object]) -> None:
    """One line of JSON for a pipe; on a terminal, the same JSON laid out by rich (when installed)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
        except ImportError:
            pass
        else:
            Console().print_json(json.dumps(summary))
            return
    print(json.dumps(summary))


def _top(args: argparse.Namespace) -> int:
    from buffer.top import run

    urls = [u.strip() for given in (args.url or ["http://127.0.0.1:8481"]) for u in given.split(",") if u.strip()]
    return run(urls, max(0.2, args.interval))


def _drain(args: argparse.Namespace) -> int:
    address = args.http_listen or os.environ.get(ENV_PREFIX + "HTTP_LISTEN", "127.0.0.1:8481")
    try:
        listen = parse_listen(address)
        assert not isinstance(listen, str)  # parse_listen refuses unix: here
        host, port = listen
    except ValueError as exc:
        print(f"ingest-buffer drain: --http-listen {exc}", file=sys.stderr)
        return 2
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = urllib.request.Request(f"http://{netloc}/drain", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            body = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"ingest-buffer drain: cannot reach the buffer's admin listener at {netloc}: {exc}",
              file=sys.stderr)
        return 1
    print(body.strip())
    return 0 if status == 200 else 1


def _send(args: argparse.Namespace) -> int:
    from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
    from buffer.send import SendFailed, resolve_format, send

    try:
        fmt = resolve_format(args.format, args.file)
    except ValueError as exc:
        print(f"ingest-buffer send: {exc}", file=sys.stderr)
        return 2
    target = args.target or os.environ.get(ENV_PREFIX + "GRPC_LISTEN", "127.0.0.1:50051")
    if target.startswith("0.0.0.0:"):
        target = "127.0.0.1:" + target.split(":", 1)[1]
    ack = {"committed": pb.ACK_LEVEL_COMMITTED, "durable": pb.ACK_LEVEL_DURABLE}.get(args.ack, pb.ACK_LEVEL_BUFFERED)
    try:
        if args.file in (None, "-"):
            stream, total = sys.stdin.buffer, None
        else:
            stream, total = open(args.file, "rb"), os.path.getsize(args.file)  # noqa: SIM115
    except OSError as exc:
        print(f"ingest-buffer send: {exc}", file=sys.stderr)
        return 2
    show = sys.stderr.isatty() if args.progress == "auto" else args.progress == "on"
    try:
        summary = send(target, args.table, fmt, stream, total=total, chunk_bytes=args.chunk_bytes, ack=ack,
                       row_count=args.row_count, flush=args.flush, progress=show, timeout=args.timeout,
                       retry_for=args.retry_for)
    except SendFailed as exc:
        _print_summary(exc.summary)
        s = exc.summary
        rest = "" if s.get("input_read_whole") else "; reading the input stopped there"
        print(f"ingest-buffer send: {exc.error}. Of the {s['rows_sent']:,} rows read and sent, the buffer "
              f"acknowledged {s['rows_acknowledged']:,} and {s['rows_failed']:,} failed{rest}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"ingest-buffer send: {exc}", file=sys.stderr)
        return 2
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    _print_summary(summary)
    flushed = summary.get("flush")
    if isinstance(flushed, dict) and not flushed.get("committed"):
        print(f"ingest-buffer send: every row sent was acknowledged, but of the rows the buffer held at the flush "
              f"barrier {flushed.get('held_rows_failed')} did not reach ClickHouse (refused for their data: see the "
              "buffer's log and its dead-letter store, --dead-letter-dir)", file=sys.stderr)
        return 1
    return 0


def _sql(args: argparse.Namespace) -> int:
    from buffer.errors import clean_message
    from buffer.sink import ClickHouseSink, command_text

    cfg = _config(args)
    if cfg is None:
        return 2
    if cfg.is_embedded:  # a `serve` holding the engine runs them, as no other process can open it
        done = _sql_on_server(cfg, args.statement)
        if done is not None:
            return done
        if _chdb_missing(f"--clickhouse-url {cfg.clickhouse_url}"):
            return 2
    sink = ClickHouseSink(cfg)
    try:
        for statement in args.statement:
            try:
                out = sink.command(statement)
            except Exception as exc:
                text = clean_message(str(exc))
                if cfg.is_embedded and ("EmbeddedServer" in text or "lock" in text.lower()):
                    text += (" — the embedded engine's path is in use by another process (chDB lets one process use "
                             "a path at a time). If it is `ingest-buffer serve`, give this command the same "
                             "--http-listen and the statements run there")
                print(f"ingest-buffer sql: {_sql_hint(text, cfg)}", file=sys.stderr)
                return 1
            if text := command_text(out):  # DDL and inserts return a summary object: nothing to show
                print(text)
    finally:
        sink.close()
    return 0


def _sql_hint(text: str, cfg: Config) -> str:
    if "UNKNOWN_DATABASE" in text:
        return text + (f" — create it first: ingest-buffer sql --database default "
                       f"\"CREATE DATABASE {cfg.effective_database()}\"")
    return text


def _sql_on_server(cfg: Config, statements: list[str]) -> int | None:
    """Runs the statements in the `serve` that holds this embedded engine, through its admin listener
    (--http-listen, from this host); None when no such server answers there."""
    import json
    import urllib.error
    import urllib.request

    address = parse_listen(cfg.http_listen)
    if isinstance(address, str):
        return None
    host = "127.0.0.1" if address[0] in ("0.0.0.0", "::") else address[0]
    host = f"[{host}]" if ":" in host else host
    path = cfg.targets()[0].embedded_path
    for i, statement in enumerate(statements):
        request = urllib.request.Request(
            f"http://{host}:{address[1]}/sql", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"statement": statement, "path": path, "database": cfg.effective_database()}).encode())
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                body = {}
            if i == 0 and (exc.code in (404, 409) or "error" not in body):
                return None  # not a buffer holding this engine (another one, or an older one)
            print(f"ingest-buffer sql: {_sql_hint(str(body.get('error', exc)), cfg)}", file=sys.stderr)
            return 1
        except (OSError, ValueError):
            if i == 0:
                return None  # nothing listens there: this process opens the engine itself
            raise
        if body.get("output"):
            print(body["output"])
    return 0


def _wal(args: argparse.Namespace) -> int:
    """inspect: what the log holds, as JSON (exit 0, or 2 when it is no log). check: the same, then
    exit 1 when it found damage (a torn tail or corrupt records). Neither changes the log."""
    from pathlib import Path

    from buffer.wal import describe
    from buffer.walformat import LogError

    try:
        info = describe(Path(args.path))
    except (LogError, OSError) as exc:
        print(f"ingest-buffer wal: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    damage = info["damage"]
    if args.action == "check":
        if damage["torn_bytes"] or damage["corrupt_records"]:
            print(f"ingest-buffer wal check: damage in {args.path}: {damage['torn_bytes']} bytes of a torn last "
                  f"write (cut off at the next start), {damage['corrupt_records']} corrupt places "
                  f"({damage['corrupt_bytes']} bytes, skipped at start and counted as lost)", file=sys.stderr)
            return 1
        print(f"ingest-buffer wal check: {args.path} is whole: {info['unsettled']['rows']} rows to flush",
              file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from buffer.demo import run_demo

    if _chdb_missing("demo"):
        return 2
    return run_demo(args.rows, args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingest-buffer", description=(
        "A sidecar that buffers rows sent over gRPC and writes them to ClickHouse in large batches."),
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"ingest-buffer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the buffer", epilog=EPILOG)
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate the settings and print them (secrets masked)",
                           epilog=EPILOG)
    add_arguments(check)
    check.add_argument("--connect", action="store_true",
                       help="also connect to ClickHouse and check the tables and their deduplication settings")
    check.set_defaults(func=_check_config)

    drain = sub.add_parser("drain", help="start a drain and wait for it (for an exec preStop hook)")
    drain.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                       help=f"the buffer's admin listener (env {ENV_PREFIX}HTTP_LISTEN; default 127.0.0.1:8481)")
    drain.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    drain.set_defaults(func=_drain)

    top = sub.add_parser("top", help="a live view of running buffers (their GET /status), q to quit")
    top.add_argument("--url", action="append", default=None, metavar="URL",
                     help="a buffer's admin listener, e.g. http://127.0.0.1:8481 (again, or comma-separated, for "
                          "several; a name with several addresses, such as a headless Service, is one per address)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between readings (default 1)")
    top.set_defaults(func=_top)

    snd = sub.add_parser("send", help="send rows from a file or stdin to a running buffer")
    snd.add_argument("file", nargs="?", default=None, help="file to send; - or absent for stdin")
    snd.add_argument("--table", required=True, help="table to insert into")
    snd.add_argument("--format", default=None,
                     help="JSONEachRow, JSONCompactEachRow, CSV, TSV, RowBinary or Native "
                          "(default: from the file's extension)")
    snd.add_argument("--target", default=None, metavar="HOST:PORT",
                     help=f"the buffer's gRPC address (env {ENV_PREFIX}GRPC_LISTEN; default 127.0.0.1:50051; "
                          "unix:/path for a socket)")
    snd.add_argument("--ack", choices=("buffered", "durable", "committed"), default="buffered",
                     help="each request acknowledged once its rows are buffered (default), fsynced to the "
                          "buffer's write-ahead log, or committed to ClickHouse")
    snd.add_argument("--flush", action="store_true", help="wait until ClickHouse has every row before exiting")
    snd.add_argument("--row-count", type=int, default=0, help="rows in the file (RowBinary and Native only)")
    snd.add_argument("--chunk-bytes", type=int, default=1024 * 1024, help="bytes per request")
    snd.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bar on stderr (auto: when it is a terminal)")
    snd.add_argument("--timeout", type=float, default=None,
                     help="seconds each request, the wait for the acknowledgements, and the --flush barrier "
                          "may each take (default: 10 s a request, 60 s with --ack committed, resent until "
                          "--retry-for; no bound on the waits)")
    snd.add_argument("--retry-for", type=float, default=60.0, metavar="SECONDS",
                     help="how long a request refused as full, or whose answer was lost, is resent (default 60)")
    snd.set_defaults(func=_send)

    sql = sub.add_parser("sql", help="run SQL on the configured ClickHouse (e.g. create the tables)",
                         epilog="With the embedded engine, stop the ingest-buffer serving that path first: chDB lets "
                                "one process use a path at a time. " + EPILOG)
    sql.add_argument("statement", nargs="+", help="SQL statements, run in order, in --database")
    add_arguments(sql)
    sql.set_defaults(func=_sql)

    wal = sub.add_parser("wal", help="look into a write-ahead log without starting the buffer")
    wal.add_argument("action", choices=("inspect", "check"),
                     help="inspect: what it holds (JSON); check: the same, exit 1 when damaged")
    wal.add_argument("path", help="the log's directory (--wal-dir)")
    wal.set_defaults(func=_wal)

    demo = sub.add_parser("demo", help="run the buffer on the embedded engine, send rows, show them land")
    demo.add_argument("--rows", type=int, default=100_000, help="rows to send")
    demo.add_argument("--data-dir", default=".ingest-buffer/demo", help="where the embedded engine keeps data")
    demo.set_defaults(func=_demo)
    return parser


# What only the server needs (`pip install 'ingest-buffer[server]'`): the client alone has grpcio,
# protobuf and orjson.
SERVER_MODULES = frozenset({"clickhouse_connect", "opentelemetry", "prometheus_client", "grpc_health",
                            "grpc_reflection", "grpc_status", "lz4", "zstandard", "crc32c", "aiohttp", "brotli",
                            "rich"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(f"ingest-buffer: this command needs the server's dependencies ({exc.name} is missing): "
              "pip install 'ingest-buffer[server]'", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
