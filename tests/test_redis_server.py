"""Tests of mqs._redis_server and the Redis fixtures of tests/conftest.py.

The servers are real redis-server processes on 127.0.0.1; without the
binary these tests are skipped (and fail when CI is set).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mqs._redis_server import (
    HOST,
    RedisServer,
    RedisServerError,
    find_redis_server,
)

if os.environ.get("CI"):
    import redis  # CI installs the test extra, so a missing one is an error
else:
    redis = pytest.importorskip("redis")

ROOT = Path(__file__).resolve().parents[1]


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_redis_server_starts_answers_and_stops(redis_server_factory):
    server = redis_server_factory()
    pid, directory = server.pid, server.directory
    assert server.running
    assert server.ping()
    assert server.url == f"redis://{HOST}:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert client.config_get("bind") == {"bind": HOST}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("dir") == {"dir": os.path.realpath(directory)}
    client.close()

    server.stop()
    assert not server.running
    assert server.pid is None
    assert not process_exists(pid)
    assert not os.path.exists(directory)
    assert not server.ping()
    server.stop()   # idempotent


def test_redis_server_requirepass_rejects_clients_without_it(
        redis_server_factory):
    server = redis_server_factory(password="pa$$:w/rd")
    assert server.url == (f"redis://:pa%24%24%3Aw%2Frd@{HOST}:{server.port}"
                          f"/0")
    anonymous = redis.Redis(host=HOST, port=server.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("k", "v")
    anonymous.close()
    client = redis.Redis.from_url(server.url)
    assert client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    assert server.ping()


def test_redis_server_config_file_is_private(redis_server_factory):
    server = redis_server_factory(password="secret")
    mode = os.stat(os.path.join(server.directory, "redis.conf")).st_mode
    assert mode & 0o077 == 0
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert b"secret" not in f.read()


@pytest.mark.parametrize("mode", ["always", "everysec"])
def test_redis_server_appendfsync_sets_append_only_file(redis_server_factory,
                                                        mode):
    server = redis_server_factory(appendfsync=mode)
    client = redis.Redis.from_url(server.url)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": mode}
    client.close()


def test_redis_server_restart_after_kill_keeps_fsynced_data(
        redis_server_factory):
    server = redis_server_factory(appendfsync="always")
    port, first_pid = server.port, server.pid
    client = redis.Redis.from_url(server.url)
    client.rpush("list", *[str(i) for i in range(100)])
    client.close()

    server.kill()
    assert not server.running
    assert not process_exists(first_pid)
    server.restart()
    assert server.port == port
    assert server.pid != first_pid
    client = redis.Redis.from_url(server.url)
    assert client.llen("list") == 100
    client.close()


def test_redis_server_extra_config_applies(redis_server_factory):
    server = redis_server_factory(config={"maxmemory": "64mb"})
    client = redis.Redis.from_url(server.url)
    assert client.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
    client.close()


def test_redis_server_context_manager_stops(redis_server_factory):
    redis_server_factory()   # skips without a binary
    with RedisServer() as server:
        pid, directory = server.pid, server.directory
        assert server.ping()
    assert not process_exists(pid)
    assert not os.path.exists(directory)


@pytest.mark.parametrize("options,match", [
    ({"appendfsync": "sometimes"},
     ("appendfsync must be one of always, everysec, no or None, got "
      "'sometimes'")),
    ({"password": "two words"}, "password must be 1 to 512 printable ASCII"),
    ({"password": ""}, "password must be 1 to 512 printable ASCII"),
    ({"config": {"Port": "1"}}, "config names must be lower-case"),
    ({"config": {"maxmemory": "1mb\nport 6379"}},
     "config value of 'maxmemory' must be a one-line str"),
    ({"start_timeout": 0}, "start_timeout must be > 0 seconds, got 0"),
])
def test_redis_server_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        RedisServer(**options)


def test_redis_server_reports_missing_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("MQS_REDIS_SERVER", str(tmp_path / "redis-server"))
    assert find_redis_server() is None
    with pytest.raises(RedisServerError, match="no redis-server binary"):
        RedisServer().start()


def test_redis_server_reports_startup_failure(redis_server_factory):
    redis_server_factory()   # skips without a binary
    server = RedisServer(config={"no-such-directive": "1"})
    with pytest.raises(RedisServerError, match="exited during startup"):
        server.start()
    assert server.directory is None
    assert not server.running


def test_redis_client_fixture_deletes_test_keys(redis_client,
                                                redis_key_prefix):
    assert redis_client.ping()
    redis_client.set(f"{redis_key_prefix}a", b"1")
    assert redis_client.get(f"{redis_key_prefix}a") == b"1"


def run_fixture_probe(ci):
    """Run the redis_url fixture in a child pytest with no server."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MQS_REDIS_URL", "CI")}
    env["MQS_REDIS_SERVER"] = "/nonexistent/redis-server"
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-rs", f"{__file__}::test_redis_url_answers_ping"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=False)


def test_redis_url_answers_ping(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    client.close()


def test_redis_fixture_skips_without_server_outside_ci():
    result = run_fixture_probe(ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "no redis-server binary on PATH" in result.stdout


def test_redis_fixture_fails_without_server_in_ci():
    result = run_fixture_probe(ci=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "CI is set, so the Redis tests fail" in result.stdout
