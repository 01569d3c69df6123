"""The kvtier:// daemon tier holds lossy-codec chunks (flat uint8 tensors) like any other:
byte-exact through shared memory and over the socket, checked by the engine on read."""

from __future__ import annotations

import uuid

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.server.process import DaemonProcess

L, H, D, CT = 2, 2, 64, 64


def engine(url: str, codec: str, salt: str, serde: str = "raw") -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk__chunk_tokens=CT,
        chunk__kv_codec=codec,
        cpu__enabled="false",
        remote__url=url,
        remote__serde=serde,
    )
    return CacheEngine(cfg, namespace=Namespace("m", "bfloat16", (L, H, D), kv_codec=codec, cache_salt=salt))


@pytest.mark.parametrize(
    "codec,transport,serde",
    [("int8", "shm", "raw"), ("int4", "tcp", "shuffle-zstd")],
)
def test_daemon_tier_round_trips_packed_chunks(
    daemon: DaemonProcess, codec: str, transport: str, serde: str
) -> None:
    url = daemon.url + ("?shm=0" if transport == "tcp" else "")
    salt = uuid.uuid4().hex[:8]  # the module's daemon is shared: a namespace of our own
    toks = list(range(7, 7 + 2 * CT + 20))  # two whole chunks and a partial tail
    kv = (torch.randn(L, 2, len(toks), H, D, generator=torch.Generator().manual_seed(1)) * 2).to(
        torch.bfloat16
    )
    local = CacheEngine(
        Config.load(env={}, chunk__chunk_tokens=CT, chunk__kv_codec=codec, cpu__pin_memory="no"),
        namespace=Namespace("m", "bfloat16", (L, H, D), kv_codec=codec, cache_salt=salt),
    )
    assert local.store(toks, kv) == len(toks)
    want = local.retrieve(toks).kv
    with local.retrieve_chunks(toks, decode=False) as v:
        want_bytes = [c.kv.clone() for _, c in v.chunks]

    writer = engine(url, codec, salt, serde)
    assert writer.store(toks, kv) == len(toks)
    assert writer.flush(10.0)
    reader = engine(url, codec, salt, serde)  # another client: nothing in process memory
    assert reader.lookup(toks) == len(toks)
    with reader.retrieve_chunks(toks, decode=False) as v:
        got_bytes = [c.kv for _, c in v.chunks]
        assert len(got_bytes) == 3 and all(g.dtype == torch.uint8 and g.dim() == 1 for g in got_bytes)
        assert all(torch.equal(g, w) for g, w in zip(got_bytes, want_bytes, strict=True))
    got = reader.retrieve(toks).kv
    assert got is not None and torch.equal(got, want)
    # raw readers of the same salt never see these chunks (the codec is in the namespace)
    assert engine(url, "none", salt).lookup(toks) == 0
    for e in (local, writer, reader):
        e.close()
