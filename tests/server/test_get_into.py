"""A socket get received straight into the caller's destinations (``DaemonClient.get(keys,
into)``, ``Tier.batched_get_into``, ``CacheEngine.retrieve(out=)`` over ``?shm=0``).

What must hold: a placed hit *is* its destination (no buffer, no copy), bit-exact; a
destination that does not match the reply (shape, dtype, layout, missing) is never written and
the reply goes through a buffer as before; a daemon whose header does not tile the payload
exactly (a hostile or broken one) cannot make the client write into a destination."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import torch
from tests.server.daemons import shared_daemon

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.wire import protocol as P
from kvtier.wire.client import DaemonClient


@pytest.fixture
def client() -> Iterator[DaemonClient]:
    d = shared_daemon(1 << 20)
    c = DaemonClient("127.0.0.1", d.port, use_shm=False, timeout_s=30)
    c.connect()
    c.clear()
    yield c
    c.close()


def _stored(c: DaemonClient, n: int, tokens: int = 32) -> tuple[list[bytes], list[torch.Tensor]]:
    kvs = [torch.randn(2, 2, tokens, 4, 16).to(torch.bfloat16) for _ in range(n)]
    keys = [bytes([0x40 + i]) * 16 for i in range(n)]
    assert c.put([(k, Chunk(kv, b"f" * 16, tokens)) for k, kv in zip(keys, kvs)]) == [True] * n
    return keys, kvs


def test_hits_land_in_their_destinations_and_are_them(client: DaemonClient) -> None:
    keys, kvs = _stored(client, 3)
    out = torch.zeros(2, 2, 96, 4, 16, dtype=torch.bfloat16)  # an engine's rows: strided views
    into = [out[:, :, 32 * i : 32 * (i + 1)] for i in range(3)]
    got = client.get(keys, into)
    for g, d in zip(got, into):
        assert g is not None and g.kv is d and g.fingerprint == b"f" * 16 and g.num_tokens == 32
        g.release()
    assert torch.equal(out, torch.cat(kvs, dim=2))


def test_a_miss_between_hits_keeps_the_others_placed(client: DaemonClient) -> None:
    keys, kvs = _stored(client, 2)
    d0, d1, d2 = (torch.full((2, 2, 32, 4, 16), 7.0, dtype=torch.bfloat16) for _ in range(3))
    got = client.get([keys[0], b"\x99" * 16, keys[1]], [d0, d1, d2])
    assert got[1] is None and bool((d1 == 7).all())  # the miss's destination is not touched
    assert got[0] is not None and got[0].kv is d0 and torch.equal(d0, kvs[0])
    assert got[2] is not None and got[2].kv is d2 and torch.equal(d2, kvs[1])


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 2, 16, 4, 16, dtype=torch.bfloat16),  # wrong shape
        torch.zeros(2, 2, 32, 4, 16, dtype=torch.float16),  # wrong dtype
        torch.zeros(2, 2, 32, 4, 32, dtype=torch.bfloat16)[..., ::2],  # rows not contiguous
        None,
    ],
    ids=["shape", "dtype", "layout", "none"],
)
def test_a_destination_that_does_not_fit_is_not_written(
    client: DaemonClient, bad: torch.Tensor | None
) -> None:
    keys, kvs = _stored(client, 2)
    good = torch.zeros(2, 2, 32, 4, 16, dtype=torch.bfloat16)
    before = None if bad is None else bad.clone()
    got = client.get(keys, [good, bad])  # one misfit: the whole reply goes through a buffer
    assert got[0] is not None and got[1] is not None
    assert got[0].kv is not good and torch.equal(got[0].kv, kvs[0]) and torch.equal(got[1].kv, kvs[1])
    assert bool((good == 0).all())
    if bad is not None:
        assert before is not None and torch.equal(bad, before)
    for g in got:
        assert g is not None
        g.release()


def test_engine_retrieve_into_out_over_the_socket() -> None:
    d = shared_daemon(1 << 20)
    cfg = Config.load(
        env={}, chunk_tokens=16, model__model_id="get-into", cpu__enabled=False, remote__url=d.url + "?shm=0"
    )
    eng = CacheEngine(cfg)
    try:
        eng.bind_model(2, 4, 16, torch.bfloat16)
        kv = torch.randn(2, 2, 64, 4, 16).to(torch.bfloat16)
        tokens = torch.arange(64) + 12345
        assert eng.store(tokens, kv) == 64
        out = torch.zeros(2, 2, 80, 4, 16, dtype=torch.bfloat16)
        client = eng.storage.tiers[0].client  # type: ignore[attr-defined]
        assert not client.shm
        recycled = client._recv_buffers._free  # a receive buffer lands here once released
        r = eng.retrieve(tokens, out=out)
        assert r.num_tokens == 64 and r.kv is not None and torch.equal(r.kv, kv)
        assert r.kv.data_ptr() == out.data_ptr() and bool((out[:, :, 64:] == 0).all())
        assert recycled == []  # received in place: no receive buffer was used
        r2 = eng.retrieve(tokens)  # no out: the engine's fresh host tensor is received into too
        assert r2.kv is not None and torch.equal(r2.kv, kv) and recycled == []
    finally:
        eng.close()


class _FakeDaemon:
    """A listener that handshakes like a daemon and answers one ``Get`` with a crafted header
    and payload (what a broken or hostile daemon could send)."""

    def __init__(self, items: list[P.GotItem | None], payload: bytes) -> None:
        self.items, self.payload = items, payload
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, c: socket.socket) -> P.Message:
        def exact(n: int) -> bytes:
            b = b""
            while len(b) < n:
                part = c.recv(n - len(b))
                if not part:
                    raise ConnectionResetError
                b += part
            return b

        hlen, _ = P.parse_prefix(exact(P.PREFIX.size), max_header=P.MAX_HEADER_BYTES, max_payload=0)
        return P.decode_header(exact(hlen))

    def _serve(self) -> None:
        c, _ = self.srv.accept()
        with c:
            self._read(c)
            c.sendall(P.encode_frame(P.Welcome(P.PROTOCOL_VERSION, "fake", 1 << 30, P.MAX_KEYS, 30.0)))
            self._read(c)
            c.sendall(P.encode_frame(P.GetReply(self.items), len(self.payload)) + self.payload)
            c.recv(1)  # until the client closes

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


def _meta(shape: list[int]) -> P.ItemMeta:
    return P.ItemMeta(b"f" * 16, shape[2], shape, "bfloat16")


@pytest.mark.parametrize(
    "case",
    ["nbytes larger than the destination", "payload longer than the items", "items overlap"],
)
def test_a_header_that_does_not_tile_the_payload_never_writes_a_destination(case: str) -> None:
    shape = [1, 2, 8, 2, 8]
    n = 1 * 2 * 8 * 2 * 8 * 2  # 512 bytes
    if case == "nbytes larger than the destination":
        items: list[P.GotItem | None] = [P.GotItem(_meta(shape), "inline", 0, 2 * n)]
        payload = b"\x01" * (2 * n)
    elif case == "payload longer than the items":
        items = [P.GotItem(_meta(shape), "inline", 0, n)]
        payload = b"\x01" * (n + 64)
    else:
        items = [P.GotItem(_meta(shape), "inline", 0, n), P.GotItem(_meta(shape), "inline", n // 2, n)]
        payload = b"\x01" * (n + n // 2)
    fake = _FakeDaemon(items, payload)
    c = DaemonClient("127.0.0.1", fake.port, token="t", use_shm=False, timeout_s=10)
    try:
        c.connect()
        dests = [torch.zeros(shape, dtype=torch.bfloat16) for _ in items]
        try:
            got = c.get([b"\x01" * 16] * len(items), dests)
        except P.ProtocolError:
            got = []  # the buffered path refuses an overrun
        assert all(bool((d == 0).all()) for d in dests)
        assert all(g is None or all(g.kv is not d for d in dests) for g in got)
    finally:
        c.close()
        fake.close()
