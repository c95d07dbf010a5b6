"""Start and stop a throwaway redis-server for tests and benchmarks.

`RedisServer` runs the ``redis-server`` binary on 127.0.0.1 on a free
TCP port, with its configuration, data and log in a new temporary
directory, waits until the server replies to PING, and stops it by its
process id. It never touches a server it did not start.

    with RedisServer(appendfsync="everysec") as server:
        client = redis.Redis.from_url(server.url)

The readiness check speaks RESP over a plain socket, so this module
needs no Redis client library. A server left running when the
interpreter exits normally is stopped by an ``atexit`` handler. If the
interpreter is killed with SIGKILL, the server keeps running: its
process id is in `RedisServer.pid`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping

from mqs.errors import MqsError

__all__ = [
    "HOST",
    "RedisServer",
    "RedisServerError",
    "find_redis_server",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
APPENDFSYNC_MODES = ("always", "everysec", "no")
# Printable ASCII without space, quotes and backslash: written into the
# config file unquoted and put into the URL percent-encoded.
_PASSWORD = re.compile(r"[!#-&(-\[\]-~]{1,512}")
_CONFIG_NAME = re.compile(r"[a-z][a-z0-9-]*")
_START_ATTEMPTS = 5

_running: set[RedisServer] = set()


class RedisServerError(MqsError, RuntimeError):
    """Raised when a redis-server cannot be found, started or stopped."""


def find_redis_server() -> str | None:
    """Return the path of the redis-server binary, or None if not found.

    The environment variable ``MQS_REDIS_SERVER``, when set, names the
    binary; otherwise ``redis-server`` is looked up on PATH.
    """
    named = os.environ.get("MQS_REDIS_SERVER")
    if named:
        return shutil.which(named)
    return shutil.which("redis-server")


class RedisServer:
    """A redis-server process on 127.0.0.1 that this object owns.

    Parameters
    ----------
    appendfsync : {"always", "everysec", "no"} or None
        Turn on the append-only file with this fsync policy; None (the
        default) runs without persistence (``appendonly no``).
    password : str or None
        Set ``requirepass``: clients must AUTH with this password. Up to
        512 printable ASCII characters without space, quotes or backslash.
    binary : str or None
        Path of redis-server (default: `find_redis_server`).
    config : mapping of str to str, or None
        More configuration directives, such as ``{"maxmemory": "64mb"}``.
        They are written after the ones above and so override them.
    start_timeout : float
        Seconds to wait for the first PONG in `start` and `restart`.

    Notes
    -----
    The server always listens on 127.0.0.1 only, with ``save ""`` (no
    RDB snapshots) and its files in `directory`, a temporary directory
    that `stop` removes. `restart` keeps the directory, so data written
    to the append-only file comes back. The port is chosen free just
    before the server starts; if another process takes it first, `start`
    tries a new port, up to 5 times.
    """

    def __init__(self, *, appendfsync: str | None = None,
                 password: str | None = None, binary: str | None = None,
                 config: Mapping[str, str] | None = None,
                 start_timeout: float = 10.0) -> None:
        if appendfsync is not None and appendfsync not in APPENDFSYNC_MODES:
            raise ValueError(
                f"appendfsync must be one of {', '.join(APPENDFSYNC_MODES)} "
                f"or None, got {appendfsync!r}")
        if password is not None and not (
                isinstance(password, str) and _PASSWORD.fullmatch(password)):
            raise ValueError(
                "password must be 1 to 512 printable ASCII characters "
                "without space, quotes or backslash, got "
                f"{type(password).__name__} of length "
                f"{len(password) if isinstance(password, str) else '?'}")
        extra = dict(config or {})
        for name, value in extra.items():
            if not (isinstance(name, str) and _CONFIG_NAME.fullmatch(name)):
                raise ValueError(
                    f"config names must be lower-case redis.conf directives "
                    f"such as 'maxmemory', got {name!r}")
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise ValueError(
                    f"config value of {name!r} must be a one-line str, "
                    f"got {value!r}")
        if not start_timeout > 0:
            raise ValueError(
                f"start_timeout must be > 0 seconds, got {start_timeout!r}")
        self.appendfsync = appendfsync
        self.password = password
        self.binary = binary
        self.config = extra
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.directory: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ---- properties ------------------------------------------------------

    @property
    def host(self) -> str:
        """Address the server listens on: always 127.0.0.1."""
        return HOST

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when stopped."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0, with the password if any."""
        if self.port is None:
            raise RedisServerError("the server has not been started")
        auth = ""
        if self.password is not None:
            auth = ":" + urllib.parse.quote(self.password, safe="") + "@"
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def log_path(self) -> str | None:
        """Path of the server's log file (its stdout and stderr)."""
        if self.directory is None:
            return None
        return os.path.join(self.directory, "redis.log")

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it replies to PING; return self.

        Raises
        ------
        RedisServerError
            If no redis-server binary is found, the server exits during
            startup, or it does not reply within `start_timeout`. The
            message contains the end of the server's log.
        """
        if self._process is not None:
            raise RedisServerError(
                f"the server is already started (pid {self._process.pid}); "
                f"stop it first")
        binary = self.binary or find_redis_server()
        if binary is None:
            raise RedisServerError(
                "no redis-server binary found on PATH or in MQS_REDIS_SERVER; "
                "install it (Debian: apt-get install redis-server)")
        self.directory = tempfile.mkdtemp(prefix="mqs-redis-")
        try:
            for attempt in range(_START_ATTEMPTS):
                self.port = _free_port()
                if self._launch(binary, last=attempt == _START_ATTEMPTS - 1):
                    return self
        except BaseException:
            self._kill_process()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self.port = None
            raise
        raise AssertionError("unreachable: the last attempt raises")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and remove its directory. Idempotent.

        Sends SIGTERM to the server's pid, which shuts Redis down cleanly
        (flushing the append-only file), and waits up to `timeout`
        seconds; a server still alive then gets SIGKILL.
        """
        self._stop_process(timeout)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; keep its files.

        `restart` then starts a new server on the same port and
        directory, which loads what the append-only file holds.
        """
        self._kill_process()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (unless already dead) and start it again.

        The new process uses the same port, configuration and directory,
        so with `appendfsync` set the data comes back.

        Raises
        ------
        RedisServerError
            As `start`, or if the server was never started.
        """
        if self.directory is None or self.port is None:
            raise RedisServerError(
                "the server has not been started; call start() first")
        self._stop_process(timeout)
        self._launch(self.binary or find_redis_server() or "redis-server",
                     last=True)

    def ping(self, timeout: float = 1.0) -> bool:
        """Return True if the server replies PONG to PING."""
        if self.port is None:
            return False
        try:
            return _ping(self.port, self.password, timeout) == b"+PONG"
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return (f"<RedisServer {HOST}:{self.port} {state} "
                f"appendfsync={self.appendfsync!r}>")

    # ---- internals -------------------------------------------------------

    def _write_config(self) -> str:
        assert self.directory is not None
        lines = {
            "bind": HOST,
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": self.directory,
            "logfile": '""',
            "save": '""',
            "appendonly": "no" if self.appendfsync is None else "yes",
        }
        if self.appendfsync is not None:
            lines["appendfsync"] = self.appendfsync
        if self.password is not None:
            lines["requirepass"] = self.password
        lines.update(self.config)
        path = os.path.join(self.directory, "redis.conf")
        # The file holds the password: readable by this user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            for name, value in lines.items():
                f.write(f"{name} {value}\n")
        return path

    def _launch(self, binary: str, last: bool) -> bool:
        """Start one process; return False if its port was taken."""
        config = self._write_config()
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [binary, config], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.directory)
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                tail = self._log_tail()
                self._process = None
                _running.discard(self)
                if "Address already in use" in tail and not last:
                    logger.debug("port %d was taken; trying another",
                                 self.port)
                    return False
                raise RedisServerError(
                    f"redis-server ({binary}) exited during startup; "
                    f"its log ends with:\n{tail}")
            if self.ping(timeout=0.5):
                logger.debug("redis-server pid %d is ready on %s:%d",
                             self._process.pid, HOST, self.port)
                return True
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server pid {self._process.pid} did not reply to "
                    f"PING on {HOST}:{self.port} within "
                    f"{self.start_timeout} s; its log ends with:\n"
                    f"{self._log_tail()}")
            time.sleep(0.01)

    def _stop_process(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "redis-server pid %d did not stop within %s s of "
                    "SIGTERM; sending SIGKILL", process.pid, timeout)
                process.kill()
                process.wait()
        self._process = None
        _running.discard(self)

    def _kill_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None
        _running.discard(self)

    def _log_tail(self, max_bytes: int = 2000) -> str:
        try:
            with open(self.log_path or "", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            return f"(log not readable: {exc})"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _encode_command(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError("redis-server closed the connection")
        data += chunk
    return data[:-2]


def _ping(port: int, password: str | None, timeout: float) -> bytes:
    """Send (AUTH and) PING; return the reply line of PING.

    A server still loading its append-only file replies -LOADING.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        if password is not None:
            sock.sendall(_encode_command("AUTH", password))
            reply = _read_line(sock)
            if reply != b"+OK":
                return reply
        sock.sendall(_encode_command("PING"))
        return _read_line(sock)


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
