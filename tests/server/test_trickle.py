"""A payload that arrives in dribs and drabs is still received whole and promptly.

The daemon asks the kernel to wake it only once ``conn.RCVLOWAT_BYTES`` of a payload (or the
rest of it) is queued (``SO_RCVLOWAT``: fewer, larger reads). These tests send payloads in
pieces far below that mark, with pauses, and end on a short tail: a low-water mark above what
will come would leave the frame waiting for its body timeout (set long here) instead of
storing it, on both the pool-sink path and the buffered path.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from tests.server.conftest import hello, raw_connect, recv_exact

from kvtier.server.conn import RCVLOWAT_BYTES
from kvtier.server.process import DaemonProcess
from kvtier.wire import protocol as P

MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess("--cpu-size", "16MiB", "--set", "server.body_timeout_s=60") as d:
        yield d


def _reply(s: socket.socket) -> tuple[P.Message, bytes]:
    hlen, plen = P.parse_prefix(
        recv_exact(s, P.PREFIX.size), max_header=P.MAX_HEADER_BYTES, max_payload=1 << 30
    )
    return P.decode_header(recv_exact(s, hlen)), recv_exact(s, plen)


def _trickle(s: socket.socket, data: bytes) -> None:
    """Half the low-water mark at once, then 4 KiB pieces, pausing now and then, then 7 bytes."""
    first = RCVLOWAT_BYTES // 2
    s.sendall(data[:first])
    time.sleep(0.2)
    body, tail = data[first:-7], data[-7:]
    for i in range(0, len(body), 4096):
        s.sendall(body[i : i + 4096])
        if i % (256 * 4096) == 0:
            time.sleep(0.05)
    time.sleep(0.2)
    s.sendall(tail)


@pytest.mark.parametrize("buffered", [False, True])
def test_a_trickled_put_is_stored_whole_well_before_its_body_timeout(
    daemon: DaemonProcess, buffered: bool
) -> None:
    size = 3 * MiB + 12  # above the low-water mark, and not a multiple of it
    data = bytes((i * 7 + buffered) % 251 for i in range(size))
    key = bytes([buffered]) * 16
    s = raw_connect(daemon.port, timeout_s=30)
    try:
        assert isinstance(hello(s), P.Welcome)
        item = P.PutItem(key, P.ItemMeta(b"f", 16, [size], "uint8"), 0)
        # buffered: one byte more than the item (items that do not tile the payload skip the
        # sink; the handler stores the item and ignores the byte)
        s.sendall(P.encode_frame(P.Put([item]), size + buffered))
        t0 = time.monotonic()
        _trickle(s, data + b"\0" * buffered)
        msg, _ = _reply(s)
        waited = time.monotonic() - t0
        assert isinstance(msg, P.Bools) and msg.values == [True]
        assert waited < 30, f"the reply took {waited:.1f} s: the frame waited for bytes that never came"
        s.sendall(P.encode_frame(P.Get([key], shm=False)))
        got, payload = _reply(s)
        assert isinstance(got, P.GetReply) and got.items[0] is not None
        assert payload[got.items[0].offset : got.items[0].offset + size] == data
        s.sendall(P.encode_frame(P.Ping()))  # the connection reads small frames again
        assert isinstance(_reply(s)[0], P.Pong)
    finally:
        s.close()
