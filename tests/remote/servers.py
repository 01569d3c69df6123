"""Real stores for tests and benchmarks: redis-server (standalone, 3-node cluster), moto's S3 and a
mooncake_master (Mooncake Store).

Every server binds 127.0.0.1 on a free port, keeps its files in a private temp dir, and is stopped
by whoever started it. ``shared_redis()`` / ``shared_s3()`` hand out one lazily started server per
test session (stopped by ``stop_shared()``, which tests/remote/conftest.py and tests/tiers/conftest.py
call at session end, with ``atexit`` as a backstop). Import this module as ``tests.remote.servers``
everywhere so there is only one registry.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
NO_REDIS_REASON = "redis-server/redis-cli not installed (apt-get install redis-server redis-tools)"


def free_port(max_port: int = 55535) -> int:
    """A free loopback port below ``max_port``: a cluster node also listens on port + 10000 (its
    bus), which must stay a valid port, so ephemeral ports above 55535 are passed over."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < max_port:
            return port
    raise RuntimeError(f"no free loopback port below {max_port} after 200 tries")


def _wait_ping(
    port: int,
    timeout_s: float = 30.0,
    password: str | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until redis on ``port`` answers PING (bounded; fails at once if ``proc`` exited)."""
    import redis

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
        try:
            c = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1.0)
            try:
                if c.ping():
                    return
            finally:
                c.close()
        except (redis.RedisError, OSError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s}s: {last}")


class _ServerProcess:
    """A server child process with a private temp dir: ``kill()`` (SIGKILL, a crash), ``stop()``
    (SIGTERM, then SIGKILL after 10 s), ``cleanup()`` (stop and remove the dir)."""

    proc: subprocess.Popen[bytes] | None
    dir: Path

    def kill(self) -> None:
        """SIGKILL: the store vanishes mid-conversation, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer(_ServerProcess):
    """One ``redis-server`` process; ``kill()`` + ``start()`` restarts it on the same port."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        cluster: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError(NO_REDIS_REASON)
        self._fixed_port = port is not None
        self.ever_started = False
        self.port = port or free_port()
        self.password = password
        self.cluster = cluster
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvtier-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart on the same port); a fresh server whose port was taken meanwhile
        retries on another free port."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError:
                if attempt == 2 or self._fixed_port or self.ever_started:
                    if not self.ever_started:
                        shutil.rmtree(self.dir, ignore_errors=True)
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--protected-mode",
            "no",
            "--enable-debug-command",
            "local",
            *self.extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            _wait_ping(self.port, password=self.password, proc=self.proc)
        except RuntimeError:
            self.stop()
            raise
        self.ever_started = True
        return self


class RedisCluster:
    """Three master-only cluster nodes (``--cluster-replicas 0``): every slot is on one of them."""

    def __init__(self, n: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(n)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        import redis

        assert REDIS_CLI is not None
        try:
            for n in self.nodes:
                n.start()
        except RuntimeError:
            self.cleanup()  # the nodes that did start
            raise
        cmd = [
            REDIS_CLI,
            "--cluster",
            "create",
            *[f"127.0.0.1:{n.port}" for n in self.nodes],
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        out = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if out.returncode != 0:
            self.cleanup()
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout!r} {out.stderr!r}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = []
            for n in self.nodes:
                c = redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=1.0)
                try:
                    states.append(c.cluster("info")["cluster_state"])
                finally:
                    c.close()
            if all(s == "ok" for s in states):
                return self
            time.sleep(0.1)
        self.cleanup()
        raise RuntimeError("redis cluster did not reach cluster_state:ok in 20s")

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


class S3Server:
    """moto's S3 in a thread of this process, on 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def cleanup(self) -> None:
        self._server.stop()


def _mooncake_master() -> tuple[str | None, str]:
    """The ``mooncake_master`` binary beside this Python (the ``mooncake`` extra's entry point) and
    the reason it cannot be used (empty when it can): the client library must import too, and it
    links libibverbs even for TCP."""
    exe = shutil.which("mooncake_master") or str(Path(sys.executable).parent / "mooncake_master")
    if not os.path.exists(exe):
        return None, "mooncake_master not installed (pip install 'kvtier[mooncake]')"
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        return None, f"mooncake.store does not import ({e}); apt-get install libibverbs1"
    return exe, ""


MOONCAKE_MASTER, NO_MOONCAKE_REASON = _mooncake_master()


class MooncakeMaster(_ServerProcess):
    """One ``mooncake_master`` (RPC + HTTP metadata + metrics ports on 127.0.0.1); ``kill()`` +
    ``start()`` restarts it on the same ports (with its in-memory metadata gone)."""

    def __init__(self) -> None:
        if MOONCAKE_MASTER is None:
            raise RuntimeError(NO_MOONCAKE_REASON)
        self.port = free_port()
        self.metadata_port = free_port()
        self.metrics_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvtier-mooncake-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mooncake://127.0.0.1:{self.port}?segment=64MiB&buffer=32MiB"

    def start(self) -> MooncakeMaster:
        assert MOONCAKE_MASTER is not None
        args = [
            MOONCAKE_MASTER,
            f"--rpc_port={self.port}",
            "--rpc_address=127.0.0.1",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={self.metadata_port}",
            "--metrics_host=127.0.0.1",
            f"--metrics_port={self.metrics_port}",
            f"--log_dir={self.dir}",
        ]
        log = open(self.dir / "master.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mooncake_master exited with {self.proc.returncode}: see {self.dir}/master.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mooncake_master did not listen on {self.port} within 30s")

    def start_store(self, segment: str = "128MB") -> subprocess.Popen[bytes]:
        """A standalone ``mooncake_client`` that contributes ``segment`` to the store and outlives
        the engine processes (the deployment where chunks survive an engine's exit); the caller
        stops it. Ready once it has mounted (bounded wait on its log line)."""
        exe = Path(MOONCAKE_MASTER or "").with_name("mooncake_client")
        port = free_port()
        log_path = self.dir / f"store-{port}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                str(exe),
                f"--global_segment_size={segment}",
                "--host=127.0.0.1",
                f"--master_server_address=127.0.0.1:{self.port}",
                "--metadata_server=P2PHANDSHAKE",
                f"--port={port}",
                f"--http_port={free_port()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mooncake_client exited with {proc.returncode}: see {log_path}")
            if b"Starting real client service" in log_path.read_bytes():
                return proc
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"mooncake_client did not start within 30s: see {log_path}")


_shared: dict[str, RedisServer | RedisCluster | S3Server | MooncakeMaster] = {}


T = TypeVar("T", RedisServer, RedisCluster, S3Server, MooncakeMaster)


def _shared_one(name: str, cls: type[T]) -> T:
    """The session's one started ``cls`` server under ``name`` (started on first use)."""
    s = _shared.get(name)
    if s is None:
        s = _shared[name] = cls().start()
    assert isinstance(s, cls)
    return s


def shared_redis() -> RedisServer:
    return _shared_one("redis", RedisServer)


def shared_cluster() -> RedisCluster:
    return _shared_one("cluster", RedisCluster)


def shared_s3() -> S3Server:
    return _shared_one("s3", S3Server)


def shared_mooncake() -> MooncakeMaster:
    return _shared_one("mooncake", MooncakeMaster)


def stop_shared() -> None:
    while _shared:
        _, s = _shared.popitem()
        s.cleanup()


atexit.register(stop_shared)
