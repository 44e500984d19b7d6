"""Settings: precedence, parsing, validation messages, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from buffer.config import ConfigError, clickhouse_target, load, mask_url, parse_duration, parse_listen, parse_size


def test_defaults_run_on_the_embedded_engine() -> None:
    cfg = load({}, env={})
    assert cfg.is_embedded and cfg.mode == "sidecar" and cfg.when_full == "block"
    assert cfg.effective_database() == "default"
    assert cfg.flush_concurrency == 2


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('mode = "gateway"\nflush-interval = "3s"\nbuffer_max_rows = 77\ntables = ["a", "b"]\n')
    env = {"INGEST_BUFFER_FLUSH_INTERVAL": "250ms", "INGEST_BUFFER_BUFFER_MAX_ROWS": "88"}
    cfg = load({"buffer_max_rows": "99"}, env=env, config_file=str(f))
    assert cfg.mode == "gateway"  # file
    assert cfg.flush_interval == 0.25  # env over file
    assert cfg.buffer_max_rows == 99  # flag over env
    assert cfg.tables == ("a", "b")


def test_every_error_names_the_setting_and_env_var() -> None:
    with pytest.raises(ConfigError) as info:
        load({"mode": "bogus"}, env={"INGEST_BUFFER_BUFFER_MAX_BYTES": "lots"})
    text = str(info.value)
    assert "--mode: 'bogus' is not one of sidecar, gateway" in text
    assert "INGEST_BUFFER_BUFFER_MAX_BYTES: 'lots' is not a size" in text and "64MiB" in text
    with pytest.raises(ConfigError) as info:
        load({"grpc_listen": "nowhere", "flush_concurrency": "0"}, env={})
    text = str(info.value)
    assert "--grpc-listen (INGEST_BUFFER_GRPC_LISTEN)" in text and "unix:/path" in text
    assert "--flush-concurrency (INGEST_BUFFER_FLUSH_CONCURRENCY): must be greater than 0" in text


def test_cross_setting_checks() -> None:
    with pytest.raises(ConfigError, match=r"max-request-bytes.*larger than --buffer-max-bytes"):
        load({"buffer_max_bytes": "1MiB", "max_request_bytes": "2MiB", "flush_max_bytes": "1MiB"}, env={})


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("flush_intervall = 3\n")
    with pytest.raises(ConfigError, match="unknown settings flush_intervall"):
        load({}, env={}, config_file=str(f))


def test_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load({}, env={}, config_file="/nonexistent/ingest.toml")


def test_sizes_and_durations() -> None:
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size("512k") == 512 * 1024 and parse_size("10") == 10
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120 and parse_duration("1.5") == 1.5
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:1") == ("127.0.0.1", 1)
    assert parse_listen("[::]:50051") == ("::", 50051)
    assert parse_listen("unix:/run/x.sock", allow_unix=True) == "/run/x.sock"
    with pytest.raises(ValueError):
        parse_listen("unix:/run/x.sock")


def test_clickhouse_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = clickhouse_target("https://alice:s%40cret@ch.example:9443/analytics")
    assert (t.interface, t.host, t.port, t.username, t.password, t.database) == (
        "https", "ch.example", 9443, "alice", "s@cret", "analytics")
    assert clickhouse_target("http://ch").port == 8123
    assert clickhouse_target("chdb:///abs/path").embedded_path == "/abs/path"
    monkeypatch.chdir(tmp_path)
    assert clickhouse_target("chdb://rel/dir").embedded_path == str(tmp_path / "rel/dir")
    with pytest.raises(ValueError, match="chdb:///abs/path"):
        clickhouse_target("tcp://ch:9000")


def test_database_comes_from_url_unless_set() -> None:
    assert load({"clickhouse_url": "http://h:8123/logs"}, env={}).effective_database() == "logs"
    assert load({"clickhouse_url": "http://h:8123/logs", "database": "x"}, env={}).effective_database() == "x"


def test_masked_config_hides_passwords() -> None:
    cfg = load({"clickhouse_url": "http://bob:hunter2@h:8123/db"}, env={})
    shown = cfg.masked()
    assert "hunter2" not in str(shown) and shown["clickhouse_url"] == "http://bob:***@h:8123/db"
    assert mask_url("http://h:8123") == "http://h:8123"


def test_a_unix_socket_needs_its_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: create it"):
        load({"grpc_listen": f"unix:{tmp_path}/missing/grpc.sock"}, env={})
    assert load({"grpc_listen": f"unix:{tmp_path}/grpc.sock"}, env={}).grpc_listen.endswith("grpc.sock")


def test_help_shows_defaults_as_they_are_written() -> None:
    import argparse

    from buffer.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "INGEST_BUFFER_BUFFER_MAX_BYTES; default 64MiB" in text
    assert "INGEST_BUFFER_FLUSH_INTERVAL; default 1s" in text and "67108864" not in text


def test_the_clickhouse_http_listener_is_open_to_all_only_on_loopback(tmp_path: Path) -> None:
    assert load({"clickhouse_http_listen": "127.0.0.1:8123"}, env={}).clickhouse_http_auth == "none"
    assert load({"clickhouse_http_listen": "[::1]:8123"}, env={}).clickhouse_http_listen == "[::1]:8123"
    with pytest.raises(ConfigError, match=r"clickhouse-http-listen.*not a loopback address.*clickhouse-http-auth"):
        load({"clickhouse_http_listen": "0.0.0.0:8123"}, env={})
    with pytest.raises(ConfigError, match=r"embedded engine has no users"):
        load({"clickhouse_http_listen": "0.0.0.0:8123", "clickhouse_http_auth": "clickhouse"}, env={})
    with pytest.raises(ConfigError, match=r"clickhouse-http-users-file"):
        load({"clickhouse_http_listen": "0.0.0.0:8123", "clickhouse_http_auth": "users-file"}, env={})
    users = tmp_path / "users"
    users.write_text("app\n")
    with pytest.raises(ConfigError, match=r"line 1: expected user:password"):
        load({"clickhouse_http_auth": "users-file", "clickhouse_http_users_file": str(users)}, env={})
    users.write_text("app:pw\n")
    cfg = load({"clickhouse_http_listen": "0.0.0.0:8123", "clickhouse_http_auth": "users-file",
                "clickhouse_http_users_file": str(users)}, env={})
    assert cfg.clickhouse_http_auth == "users-file"
    remote = load({"clickhouse_http_listen": "0.0.0.0:8123", "clickhouse_http_auth": "clickhouse",
                   "clickhouse_url": "http://ch:8123"}, env={})
    assert remote.clickhouse_http_auth == "clickhouse"
