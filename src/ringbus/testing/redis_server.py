"""A private redis-server for tests and benchmarks.

One process on a free loopback port in its own temporary directory,
persistence off unless AOF is asked for.  ``restart()`` keeps the port and the
data directory; ``close()`` kills it by pid and removes the directory.  On
Linux the server gets SIGKILL when the thread that started it dies (the
parent-death signal), so it never outlives a killed test or bench process.

    with RedisServer() as server:
        use(server.url)

Without the ``redis-server`` binary, ``RedisServer()`` raises
``RedisServerNotFound``; callers decide whether that is a skip or an n/a.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from types import TracebackType

__all__ = [
    "RedisCluster",
    "RedisServer",
    "RedisServerNotFound",
    "find_redis_server",
    "free_port",
]

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class RedisServerNotFound(RuntimeError):
    """The ``redis-server`` executable is not on PATH (nor given)."""


def find_redis_server(executable: str | None = None) -> str:
    """The path of ``redis-server``; raises ``RedisServerNotFound`` if missing."""
    path = shutil.which(executable or "redis-server")
    if path is None:
        raise RedisServerNotFound(
            f"{executable or 'redis-server'} is not installed or not on PATH "
            "(apt-get install redis-server)"
        )
    return path


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that sets PR_SET_PDEATHSIG to SIGKILL (None off Linux).

    libc is looked up here, in the parent: the child between fork and exec only
    calls it (no import there).  If the parent is already gone when the child
    gets there, the child exits.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class RedisServer:
    """One redis-server process on ``127.0.0.1:port`` (started by the constructor).

    aof: append-only file with ``appendfsync always`` (data survives ``restart``);
    otherwise no persistence at all.  ``executable`` defaults to the one on PATH.
    """

    def __init__(
        self,
        aof: bool = False,
        *,
        executable: str | None = None,
        startup_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.executable = find_redis_server(executable)
        self.aof = aof
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ringbus-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (None when stopped)."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start the server (same port and directory as before) and wait for PONG."""
        if self.proc is not None:
            raise RuntimeError(f"redis-server is already running (pid {self.proc.pid})")
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", self.dir,
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
        end = time.monotonic() + self.startup_timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                status = self.proc.poll()
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"redis-server did not start on port {self.port} "
                    f"({'exit status ' + str(status) if status is not None else 'no PONG'})"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Send ``sig`` to the server's pid and reap it (SIGKILL after ``timeout``)."""
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill the server (SIGKILL) and remove its directory; idempotent."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def cluster_port(host: str = HOST) -> int:
    """A free port for a cluster node: at most 55535, with the cluster bus
    port (``port + 10000``) free too."""
    import random

    for _ in range(1000):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind((host, p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """A Redis Cluster of ``nodes`` masters (no replicas) on loopback ports,
    each a ``RedisServer`` with ``--cluster-enabled yes`` in its own
    directory, joined with ``redis-cli --cluster create`` and ready once
    every node reports ``cluster_state:ok``.  ``close()`` kills them by pid.
    Raises ``RedisServerNotFound`` without ``redis-server`` or ``redis-cli``.

        with RedisCluster() as cluster:
            use(cluster.url)  # redis+cluster://127.0.0.1:<port>
    """

    def __init__(self, nodes: int = 3, *, startup_timeout: float = 60.0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerNotFound("redis-cli is not installed or not on PATH")
        self.nodes: list[RedisServer] = []
        try:
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
            for _ in range(nodes):
                self.nodes.append(RedisServer(port=cluster_port(), extra_args=args))
            addrs = [f"{HOST}:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addrs, "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=startup_timeout,
            )
            self._wait_ok(cli, startup_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ok(self, cli: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        for n in self.nodes:
            while True:
                out = subprocess.run(
                    [cli, "-h", HOST, "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                ).stdout
                if "cluster_state:ok" in out:
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"Redis Cluster node {n.port} not ok: {out[:200]}")
                time.sleep(0.1)

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port of the first node>`` (the seed)."""
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
