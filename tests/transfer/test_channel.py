"""The PD transfer channel on the CPU: its protocol, two processes exchanging host (shm) handles,
and every fallback to the tier path. The CUDA IPC path: ``tests/gpu/test_channel_cuda.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine
from kvtier.transfer import channel_protocol as P
from kvtier.transfer.channel import ChannelClient, ChannelServer, receive_kv, send_kv
from kvtier.transfer.channel_handles import map_item

sys.path.insert(0, str(Path(__file__).parent))
from channel_peer import chunk_key, chunk_kv

PEER = Path(__file__).parent / "channel_peer.py"


def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ch.sock")


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A producer process offering 4 chunks of 16 tokens as host (shm) handles."""
    path = sock_path(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(PEER), path, "cpu", "4", "16"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield path, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_messages_round_trip_and_bad_frames_are_refused() -> None:
    msgs: list[P.Message] = [
        P.Hello(P.CHANNEL_VERSION, "h/boot", "cuda:0", ["cuda"]),
        P.Fetch(3, [b"k" * 16]),
        P.Offer(3, [P.Item(b"k" * 16, P.ShmHandle("psm_x", 64), "bfloat16", [2, 2], [2, 1], 0)]),
        P.Done(3),
        P.Refuse("no"),
    ]
    for m in msgs:
        frame = P.encode(m)
        assert P.decode(frame[P.PREFIX.size :]) == m
    with pytest.raises(P.ChannelProtocolError, match="bad channel frame"):
        P.decode(b"\x93garbage")
    with pytest.raises(P.ChannelProtocolError):
        P.decode(P.encode(P.Fetch(1, [b"k"] * (P.MAX_KEYS + 1)))[P.PREFIX.size :])  # over a bound
    a, b = socket.socketpair()
    with a, b:
        a.sendall(P.PREFIX.pack(P.MAX_FRAME_BYTES + 1))
        with pytest.raises(P.ChannelProtocolError, match="exceeds"):
            P.recv(b)  # refused from the length alone, before reading a body


def test_an_item_claiming_memory_past_its_block_is_refused() -> None:
    bad = P.Item(b"k", P.ShmHandle("psm_nope", 16), "float32", [2, 4], [4, 1], 0)  # 32 bytes > 16
    with pytest.raises(ValueError, match="past its 16-byte memory"):
        map_item(bad)


def test_two_processes_exchange_chunks_by_shm_handle(peer: tuple[str, subprocess.Popen[str]]) -> None:
    path, proc = peer
    client = ChannelClient(path, "cpu", accept=("shm",), timeout_s=30)
    got: dict[int, torch.Tensor] = {}
    keys = [chunk_key(i) for i in (0, 1, 2, 3, 9, 4)]  # chunk 9 was never offered: a hole
    assert client.fetch(keys, lambda i, kv: got.__setitem__(i, kv.clone())) == 4
    assert sorted(got) == [0, 1, 2, 3]
    for i, kv in got.items():
        assert torch.equal(kv, chunk_kv(i, 16))  # bit-exact, through the producer's memory
    assert client.stats.chunks == 4 and client.stats.fallbacks["not-held"] == 1
    assert client.fetch([chunk_key(2)], lambda i, kv: None) == 1  # the same connection, again
    client.close()
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.stdout is not None and proc.stdout.read().strip() == "5"
    assert proc.wait(timeout=30) == 0


def test_unreachable_producer_is_a_fallback_then_a_rest(tmp_path: Path) -> None:
    client = ChannelClient(sock_path(tmp_path), "cpu", accept=("shm",), timeout_s=1, retry_s=60)
    t0 = time.monotonic()
    assert client.fetch([b"k"], lambda i, kv: None) == 0
    assert client.fetch([b"k"], lambda i, kv: None) == 0  # resting: does not even try
    assert time.monotonic() - t0 < 30
    assert client.stats.fallbacks == {"unreachable": 1, "resting": 1}


def test_not_cuda_or_no_common_handle_kind_falls_back(tmp_path: Path) -> None:
    kv = make_kv(16, seed=1)
    with ChannelServer(sock_path(tmp_path)) as server:  # a CPU producer: it offers shm handles
        assert server.offer(b"k", kv)
        cpu = ChannelClient(server.path, "cpu")  # default: CUDA handles only
        assert cpu.fetch([b"k"], lambda i, t: None) == 0 and cpu.stats.fallbacks == {"not-cuda": 1}
        gpu = ChannelClient(server.path, "cuda")  # a CUDA consumer does not map host handles
        assert gpu.fetch([b"k"], lambda i, t: None) == 0 and gpu.stats.fallbacks == {"refused": 1}
        assert server.refusals == 1


def test_receive_takes_the_channel_first_then_the_tiers(engine: CacheEngine, tmp_path: Path) -> None:
    tokens = make_tokens(70, seed=5)  # 4 full 16-token chunks + a 6-token tail
    kv = make_kv(70, seed=5)
    out = torch.zeros_like(kv)
    with ChannelServer(sock_path(tmp_path)) as server:
        assert send_kv(engine, server, tokens, kv) == 64  # full chunks offered; all stored too
        assert engine.lookup(tokens) == 70
        client = ChannelClient(server.path, "cpu", accept=("shm",))
        r = receive_kv(engine, client, tokens, out)
        assert (r.channel_tokens, r.tier_tokens) == (64, 6) and torch.equal(out, kv)
        keys = engine.keys(tokens)
        server.close()  # the producer goes away: everything from the tiers, same bytes
        out.zero_()
        r = receive_kv(engine, client, tokens, out)
        assert (r.channel_tokens, r.tier_tokens) == (0, 70) and torch.equal(out, kv)
        assert client.stats.fallbacks["unreachable"] == 1
    with ChannelServer(sock_path(tmp_path)) as server:  # holds only the first two chunks
        for k in keys[:2]:
            server.offer(k.digest, kv[:, :, k.start : k.end])
        out.zero_()
        r = receive_kv(engine, ChannelClient(server.path, "cpu", accept=("shm",)), tokens, out)
        assert (r.channel_tokens, r.tier_tokens) == (32, 38) and torch.equal(out, kv)
        out.zero_()
        r = receive_kv(engine, None, tokens[:48], out)  # no channel at all
        assert (r.channel_tokens, r.tier_tokens) == (0, 48) and torch.equal(out[:, :, :48], kv[:, :, :48])


def test_outbox_evicts_oldest_but_not_a_chunk_a_consumer_holds(tmp_path: Path) -> None:
    kv = make_kv(16, seed=2)
    nbytes = kv.numel() * kv.element_size()
    server = ChannelServer(sock_path(tmp_path), max_bytes=2 * nbytes)
    assert server.offer(b"a", kv) and server.offer(b"b", kv)
    items, _ = server._lease([b"a"])  # a consumer fetched a and is copying it
    assert len(items) == 1
    assert server.offer(b"c", kv)
    assert server.held() == 3 - 1 and [k for k in server._box] == [b"a", b"c"]  # b went, a is leased
    server._unlease([b"a"])
    assert server.offer(b"d", kv) and list(server._box) == [b"c", b"d"]
    assert not server.offer(b"huge", make_kv(64, seed=3))  # larger than the whole outbox
    server.close()
