"""A producer in its own process: ``python channel_peer.py SOCKET DEVICE N_CHUNKS TOKENS [KEYS_HEX]``.

Offers ``N_CHUNKS`` chunks (``chunk_kv(i, TOKENS)`` on ``DEVICE``) under ``chunk_key(i)`` (or the
comma-separated hex digests ``KEYS_HEX``), prints ``ready``, serves until stdin closes, then
prints how many chunks it served and exits.
"""

from __future__ import annotations

import sys

import torch

L, H, D = 4, 2, 16


def chunk_key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunk_kv(i: int, tokens: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(L, 2, tokens, H, D, generator=g).to(torch.bfloat16).to(device)


def main() -> None:
    from kvtier.transfer.channel import ChannelServer

    path, device, n, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    keys = (
        [bytes.fromhex(h) for h in sys.argv[5].split(",")]
        if len(sys.argv) > 5
        else [chunk_key(i) for i in range(n)]
    )
    with ChannelServer(path) as server:
        # one buffer for all chunks, offered as views: what a producer's gather buffer would be
        big = torch.cat([chunk_kv(i, tokens, device) for i in range(n)], dim=2)
        for i in range(n):
            assert server.offer(keys[i], big[:, :, i * tokens : (i + 1) * tokens])
        print("ready", flush=True)
        sys.stdin.read()
        print(server.served_chunks, flush=True)


if __name__ == "__main__":
    main()
