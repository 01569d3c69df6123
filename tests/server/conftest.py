"""Fixtures for daemon tests: a module-shared daemon process and raw-socket helpers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from kvtier.server.process import DaemonProcess
from kvtier.wire import protocol as P
from kvtier.wire.token_file import default_token_path, read_token_file


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """A 64 MiB daemon shared by one test module (tests must not rely on it being empty)."""
    with DaemonProcess("--cpu-size", "64MiB", "--chunk-tokens", "16", "--lease-timeout", "2") as d:
        yield d
    assert d.proc is not None and d.proc.returncode == 0, d.log_tail()


def raw_connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    s.settimeout(timeout_s)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionResetError("closed")
        buf += part
    return buf


def read_reply(s: socket.socket) -> P.Message | None:
    """The next reply frame, or ``None`` if the daemon closed the connection."""
    try:
        hlen, plen = P.parse_prefix(
            recv_exact(s, P.PREFIX.size), max_header=P.MAX_HEADER_BYTES, max_payload=1 << 30
        )
        msg = P.decode_header(recv_exact(s, hlen))
        recv_exact(s, plen)
        return msg
    except (ConnectionError, TimeoutError):
        return None


def hello(s: socket.socket, token: str | None = None, want_shm: bool = False) -> P.Message | None:
    """Handshake; ``token=None``: the one the daemon generated for its port (as a client does)."""
    if token is None:
        token = read_token_file(default_token_path(s.getpeername()[1]))
    s.sendall(P.encode_frame(P.Hello(P.PROTOCOL_VERSION, token, want_shm, "test")))
    return read_reply(s)
