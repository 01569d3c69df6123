"""``kvtier server``: the cache in its own process, serving engines over TCP + shared memory.

One asyncio loop accepts connections and reads frames; request handlers run on a small thread
pool (tier work — copies, disk reads — must not stall other clients' frames), one request at a
time per connection. With the CPU tier alone, every request but a socket ``Put`` is pure
bookkeeping (shared-memory clients copy the bytes themselves) and runs on the loop directly. The HTTP face (``server/http.py``) runs in its own thread.

Robustness, by construction:
* a frame is size-checked from its 12-byte prefix before its body is read; before the
  handshake only ``MAX_HELLO_BYTES`` are accepted, and the handshake must finish within
  ``handshake_timeout_s``; a body must arrive within ``body_timeout_s``;
* a frame-level error (bad magic, oversize, wrong version, bad token) is answered with an
  ``Error`` and the connection is closed; a well-framed but invalid request gets an ``Error`` and
  the connection stays usable; an unexpected exception in a handler is logged and answered as
  ``internal`` — no input can stop the loop or the other clients;
* socket payloads in flight are bounded per connection (``max_payload_bytes``) and over all
  connections (``max_inflight_bytes``, a ``PayloadBudget``), allocated as their bytes arrive,
  and a slow sender is cut off (``body_timeout_s``): see ``server/conn.py``;
* a connection's end (EOF, reset, kill of the client) releases its leases and reservations,
  and its buffers (``Conn.dispose``).

Lifecycle: SIGTERM/SIGINT stop accepting, let in-flight requests finish, end every session,
flush the TierManager (pending writes to disk) and close the tiers (the disk tier persists its
index; the shared segment is unlinked). A restarted daemon rebuilds the disk tier from its
directory and removes segments a killed daemon left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.config import Config
from kvtier.errors import KVTierError
from kvtier.server.auth import ensure_token_file
from kvtier.server.budget import PayloadBudget
from kvtier.server.conn import Conn, Payload
from kvtier.server.service import CacheService, Reply, Session
from kvtier.server.sink import PutSink
from kvtier.server.startup import notify_ready, startup_line
from kvtier.wire import protocol as P
from kvtier.wire.token_file import default_token_path

log = logging.getLogger(__name__)


class ServerSetupError(KVTierError, ValueError):
    """The daemon cannot start with these settings (e.g. a public bind without a token)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    if not path:
        return ""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ServerSetupError(f"auth token file {path}: {e.strerror}") from e
    if not token or len(token) > 256:
        raise ServerSetupError(f"auth token file {path}: expected 1..256 characters of token")
    return token


class Daemon:
    """The server process's state; ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(
        self,
        config: Config,
        *,
        ready_file: str | None = None,
        shm_dir: str = "/dev/shm",
        max_payload_bytes: int = P.DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = 1024,
        handshake_timeout_s: float = 5.0,
        body_timeout_s: float | None = None,
        max_inflight_bytes: int | None = None,
        workers: int = 4,
    ) -> None:
        sc = config.server
        self.token = read_token(sc.auth_token_file)
        if not is_loopback(sc.host) and not self.token:
            raise ServerSetupError(
                f"refusing to listen on non-loopback address {sc.host!r} without an auth token: "
                "pass --auth-token-file FILE (clients put the same token in their config), or bind 127.0.0.1"
            )
        self.config = config
        self.shm_dir = shm_dir
        self.token_file = sc.auth_token_file
        """The token's file: the operator's, or (after start) the one generated beside the pool."""
        self._generated_token = False
        self.ready_file = ready_file
        self.max_payload_bytes = max_payload_bytes
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.body_timeout_s = sc.body_timeout_s if body_timeout_s is None else body_timeout_s
        inflight = sc.max_inflight_bytes if max_inflight_bytes is None else max_inflight_bytes
        if inflight < max_payload_bytes:
            raise ServerSetupError(
                f"server.max_inflight_bytes ({inflight}) must be >= server.max_payload_bytes ({max_payload_bytes})"
            )
        self.budget = PayloadBudget(inflight)
        self.server_id = secrets.token_hex(8)
        self.service = CacheService(config, shm_dir=shm_dir, max_payload_bytes=max_payload_bytes)
        self.service.budget = self.budget
        self._memory_only = len(self.service.manager.tiers) == 1
        """Only the shared CPU tier: no request but a socket ``Put`` copies or waits on I/O."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvtier-srv")
        self._conns: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.http_port = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        """Ask a running daemon to shut down gracefully (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self) -> None:
        from kvtier.server.http import HttpFace

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        sc = self.config.server
        server = await self._loop.create_server(
            lambda: Conn(self._on_connect, body_timeout_s=self.body_timeout_s, budget=self.budget),
            sc.host,
            sc.port,
            backlog=512,
            start_serving=False,  # not before the token is known
        )  # SO_REUSEADDR (the default on POSIX): a restarted daemon rebinds its port at once
        self.port = server.sockets[0].getsockname()[1]
        if not self.token:  # the default: a token only this user can read, beside the pool
            path = default_token_path(self.port, self.shm_dir)
            self.token = ensure_token_file(path)
            self.token_file, self._generated_token = str(path), True
        # /stats stays open with the generated token (counters only, like /metrics), so
        # `kvtier stats` works on the host; /lookup reveals which prompts are cached: guarded
        http = HttpFace(
            self.service, sc.host, sc.http_port, token=self.token, guard_stats=not self._generated_token
        )
        self.http_port = http.port
        http.start()
        await server.start_serving()
        reaper = asyncio.create_task(self._reaper())
        self._write_ready()
        log.info(
            "%s",
            startup_line(
                self.config,
                self.port,
                self.http_port,
                self.service.manager.stats(),
                str(self.service.segment.path),
            ),
        )
        notify_ready(f"serving on {sc.host}:{self.port}")
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down: draining %d connection(s)", len(self._conns))
            server.close()
            reaper.cancel()
            for t in list(self._conns):
                t.cancel()  # each finishes its in-flight request (shielded) first
            if self._conns:
                await asyncio.wait(self._conns, timeout=30)
            await server.wait_closed()
            http.stop()
            self._pool.shutdown(wait=True)
            self.service.close()  # flush pending writes, close tiers, unlink the segment
            if self._generated_token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.token_file)
            if self.ready_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.ready_file)
            log.info("kvtier server stopped")

    def _write_ready(self) -> None:
        if not self.ready_file:
            return
        info = {
            "pid": os.getpid(),
            "host": self.config.server.host,
            "port": self.port,
            "http_port": self.http_port,
            "shm_path": str(self.service.segment.path),
            "token_file": self.token_file,
        }
        tmp = f"{self.ready_file}.tmp"
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, self.ready_file)

    async def _reaper(self) -> None:
        period = max(0.05, min(5.0, self.service.lease_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            self.service.reap()

    # -- connections ----------------------------------------------------------------------------
    async def _on_connect(self, conn: Conn) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)
        if len(self._conns) > self.max_connections:
            await conn.send_error("busy", f"the daemon serves at most {self.max_connections} connections")
            conn.close()
            return
        session: Session | None = None
        try:
            session = await self._handshake(conn)
            if session is not None:
                await self._serve(session, conn)
        except asyncio.CancelledError:
            pass
        except (OSError, asyncio.IncompleteReadError):  # incl. ConnectionError, TimeoutError
            pass  # the client went away or stalled; its state is released below
        except P.ProtocolError as e:
            self.service.counters.protocol_errors += 1
            log.info("closing a connection: %s", e)
            await conn.send_error("protocol", str(e))
        finally:
            if session is not None:
                self.service.end_session(session)
            conn.dispose()

    async def _handshake(self, conn: Conn) -> Session | None:
        msg, _ = await asyncio.wait_for(conn.read_frame(), self.handshake_timeout_s)
        if not isinstance(msg, P.Hello):
            raise P.ProtocolError(f"expected hello, got {type(msg).__name__}")
        if msg.version != P.PROTOCOL_VERSION:
            raise P.ProtocolError(
                f"protocol version {msg.version} is not supported; this daemon speaks {P.PROTOCOL_VERSION}"
            )
        if self.token and not hmac.compare_digest(msg.token.encode(), self.token.encode()):
            self.service.counters.auth_failures += 1
            await conn.send_error("auth", "wrong or missing auth token")
            return None
        seg = self.service.segment
        welcome = P.Welcome(
            P.PROTOCOL_VERSION,
            self.server_id,
            self.max_payload_bytes,
            P.MAX_KEYS,
            self.service.lease_timeout_s,
        )
        if msg.want_shm:
            welcome.shm_path, welcome.shm_bytes, welcome.shm_nonce = str(seg.path), seg.arena_bytes, seg.nonce
        conn.max_header, conn.max_payload = P.MAX_HEADER_BYTES, self.max_payload_bytes
        conn.sink = self.service.sink_put  # socket puts land in pool space (server/sink.py)
        await conn.send(welcome)
        return self.service.new_session(msg.client)

    async def _serve(self, s: Session, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg, payload = await conn.read_frame()
            if isinstance(msg, P.Release):
                self.service.release(s, msg.leases)
                continue
            try:
                if self._memory_only and (not isinstance(msg, P.Put) or isinstance(payload, PutSink)):
                    # bookkeeping only (pins, leases, allocations): faster on the loop than a thread hop
                    reply, parts, after = self._handle(s, msg, payload)
                else:
                    # shielded: a shutdown lets the request finish and its reply go out
                    fut = loop.run_in_executor(self._pool, self._handle, s, msg, payload)
                    try:
                        reply, parts, after = await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        for cb in (await fut)[2]:  # let it finish: end_session must see all it took
                            cb()
                        raise
            finally:
                conn.done_with(payload)  # handled: its bytes are in the pool now
                payload = None
            try:
                await conn.send(reply, parts)
            finally:
                for cb in after:
                    cb()

    def _handle(self, s: Session, msg: P.Message, payload: Payload | PutSink | None) -> Reply:
        try:
            return self.service.handle(s, msg, payload)
        except P.ProtocolError as e:
            self.service.counters.protocol_errors += 1
            return P.Error("invalid", str(e)), [], []
        except Exception as e:  # a bug must cost one request, not the daemon
            log.exception("internal error handling %s", type(msg).__name__)
            return P.Error("internal", f"{type(e).__name__}: {e}"), [], []
