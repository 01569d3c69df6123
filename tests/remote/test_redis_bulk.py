"""The Redis tier's bulk reply reader (``tiers/redis_bulk.py``) on hand-made byte streams: values
split across reads, nil in RESP2 and RESP3, and every malformed stream is an error, never a value."""

from __future__ import annotations

import socket
import threading

import pytest
import redis

from kvtier.tiers.redis_bulk import BulkReader


def _reader(stream: bytes, piece: int = 7) -> BulkReader:
    a, b = socket.socketpair()

    def feed() -> None:
        for i in range(0, len(stream), piece):
            b.sendall(stream[i : i + piece])
        b.close()

    threading.Thread(target=feed, daemon=True).start()
    a.settimeout(10)
    return BulkReader(a)


def test_values_and_nils_in_pieces() -> None:
    value = bytes(range(256)) * 40
    r = _reader(
        b"$3\r\nabc\r\n$-1\r\n_\r\n$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n$0\r\n\r\n"
    )
    assert r.bulk() == b"abc"
    assert r.bulk() is None and r.bulk() is None
    assert r.bulk() == value
    assert r.bulk() == b"" and not r.pending


@pytest.mark.parametrize(
    "stream",
    [b"-ERR wrong type\r\n", b":12\r\n", b"$3\r\nabcXY", b"$3\r\nab", b"x" * 100],
    ids=["error", "not-bulk", "no-crlf", "cut-short", "no-line"],
)
def test_a_malformed_stream_raises(stream: bytes) -> None:
    with pytest.raises((redis.RedisError, ConnectionError)):
        _reader(stream).bulk()
