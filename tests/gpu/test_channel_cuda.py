"""The PD channel's CUDA IPC path: a producer process and a consumer (this process) on one GPU.

The producer offers views of one device buffer; the consumer maps them through CUDA IPC handles
and copies device to device: bit-exact, no host hop. ``receive_kv`` takes the chunks the
producer holds from it and the rest from the tiers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.transfer.channel import ChannelClient, receive_kv

sys.path.insert(0, str(Path(__file__).parent.parent / "transfer"))
from channel_peer import D, H, L, chunk_key, chunk_kv

PEER = Path(__file__).parent.parent / "transfer" / "channel_peer.py"
pytestmark = pytest.mark.gpu
T = 64  # tokens per chunk


def start_peer(path: str, n: int, keys: list[bytes] | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, str(PEER), path, "cuda", str(n), str(T)]
    if keys is not None:
        args.append(",".join(k.hex() for k in keys))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop_peer(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    out = proc.stdout.read().strip()
    assert proc.wait(timeout=60) == 0
    return out


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "ch.sock")


def test_cuda_ipc_chunks_arrive_bit_exact_without_a_host_hop(sock: str) -> None:
    proc = start_peer(sock, 4)
    try:
        client = ChannelClient(sock, "cuda:0", timeout_s=60)
        out = torch.zeros(L, 2, 4 * T, H, D, dtype=torch.bfloat16, device="cuda")

        def put(i: int, kv: torch.Tensor) -> None:
            assert kv.is_cuda  # the producer's device memory, mapped here
            out[:, :, i * T : (i + 1) * T].copy_(kv)

        assert client.fetch([chunk_key(i) for i in range(4)], put) == 4
        want = torch.cat([chunk_kv(i, T, "cuda") for i in range(4)], dim=2)
        assert torch.equal(out, want)
        assert client.stats.bytes == want.numel() * want.element_size() and not client.stats.fallbacks
        client.close()
    finally:
        served = stop_peer(proc)
    assert served == "4"


def test_receive_kv_on_cuda_mixes_channel_and_tiers(sock: str) -> None:
    cfg = Config.load(env={}, chunk_tokens=T, cpu__max_bytes="64MiB", model__model_id="ch-test")
    eng = CacheEngine(cfg)
    eng.bind_model(L, H, D, torch.bfloat16)
    tokens = list(range(1000, 1000 + 4 * T))
    kv = torch.cat([chunk_kv(i, T) for i in range(4)], dim=2)
    assert eng.store(tokens, kv) == 4 * T  # the tier path holds everything
    keys = [k.digest for k in eng.keys(tokens)]
    proc = start_peer(sock, 2, keys[:2])  # the producer still holds the first two chunks
    try:
        out = torch.zeros(L, 2, 4 * T, H, D, dtype=torch.bfloat16, device="cuda")
        r = receive_kv(eng, ChannelClient(sock, "cuda:0", timeout_s=60), tokens, out)
        assert (r.channel_tokens, r.tier_tokens) == (2 * T, 2 * T)
        assert torch.equal(out.cpu(), kv)
    finally:
        stop_peer(proc)
        eng.close()
