"""The daemon's socket path (``?shm=0``) with the issue-21 copy cuts: a strided chunk sent as
slabs by ``sendmsg``, large replies written by ``os.writev``, and recycled receive buffers that
must never be reused while a chunk still views them."""

from __future__ import annotations

import torch
from tests.server.daemons import shared_daemon

from kvtier.chunk import Chunk
from kvtier.server.conn import DIRECT_SEND_BYTES
from kvtier.wire.client import DaemonClient


def _client() -> DaemonClient:
    d = shared_daemon(1 << 20)  # the conformance suite's daemon: started once per session
    c = DaemonClient("127.0.0.1", d.port, use_shm=False, timeout_s=30)
    c.connect()
    c.clear()
    return c


def test_strided_chunks_round_trip_and_held_views_survive_later_gets() -> None:
    c = _client()
    try:
        big = torch.randn(1, 2, 600, 8, 64)  # a token-range view of it is strided, not contiguous
        parts = {}
        for i, (a, b) in enumerate([(0, 128), (128, 256)]):  # 256 KiB each
            view = big[:, :, a:b]
            assert not view.is_contiguous() and view.nbytes >= DIRECT_SEND_BYTES
            key = bytes([i]) * 16
            parts[key] = view.clone()
            assert c.put([(key, Chunk(view, b"f" * 16, b - a))]) == [True]
        k0, k1 = list(parts)
        (first,) = c.get([k0])
        assert first is not None and torch.equal(first.kv, parts[k0])
        for _ in range(3):  # while `first` is held, its buffer must not be handed out again
            (other,) = c.get([k1])
            assert other is not None and torch.equal(other.kv, parts[k1])
            other.release()
        assert torch.equal(first.kv, parts[k0])
        first.release()
        (again,) = c.get([k0])
        assert again is not None and torch.equal(again.kv, parts[k0])
        again.release()
    finally:
        c.close()
