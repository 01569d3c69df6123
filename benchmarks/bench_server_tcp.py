"""The daemon over TCP (``kvtier://host:port?shm=0``) against a plain socket moving the same
bytes, same run (issue 21.3).

* anchor: a raw loopback TCP socket to a helper process in Python (``sendall`` of one buffer;
  ``recv_into`` a preallocated buffer; a one-byte ack per transfer) — what any Python client of
  a remote store could reach at best on this machine;
* kvtier: ``CacheEngine.store`` / ``retrieve`` of the same bytes through the daemon, socket mode
  (every retrieve checked bit-exact), retrieving into a preallocated ``out`` as an engine does
  (a fresh 64 MiB host tensor costs more in page faults here than the transfer).

Interleaved per repetition (a noisy shared machine), medians. ``run()`` returns the rows for
``bench_all.py``; ``python benchmarks/bench_server_tcp.py --tokens 1024`` for a quick look.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess

RAW_SERVER = r"""
import socket, sys
n = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(n); view = memoryview(buf)
while True:
    op = c.recv(1)
    if not op:
        break
    if op == b"s":  # client sends n bytes
        got = 0
        while got < n:
            k = c.recv_into(view[got:])
            if not k:
                raise SystemExit
            got += k
        c.sendall(b"k")
    else:  # client receives n bytes
        c.sendall(view)
"""


class RawPeer:
    """A helper process at the other end of one loopback TCP connection."""

    def __init__(self, nbytes: int) -> None:
        self.n = nbytes
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RAW_SERVER, str(nbytes)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(nbytes)

    def send(self) -> None:
        self.sock.sendall(b"s")
        self.sock.sendall(self.buf)
        self.sock.recv(1)

    def recv(self) -> None:
        self.sock.sendall(b"r")
        view, got = memoryview(self.buf), 0
        while got < self.n:
            got += self.sock.recv_into(view[got:])

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)


def _engine(url: str, chunk_tokens: int, geometry: tuple[int, int, int]) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=chunk_tokens,
        model__model_id="bench",
        cpu__enabled=False,
        remote__url=url,
        remote__timeout_s=60.0,
    )
    eng = CacheEngine(cfg)
    eng.bind_model(*geometry, torch.bfloat16)
    return eng


def run(
    tokens: int = 1024,
    repeat: int = 5,
    chunk_tokens: int = 256,
    geometry: tuple[int, int, int] = (32, 8, 128),
    pool: str = "2GiB",
) -> dict[str, Any]:
    torch.set_num_threads(1)
    layers, heads, dim = geometry
    kv = torch.randn(layers, 2, tokens, heads, dim).to(torch.bfloat16)
    nbytes = kv.numel() * kv.element_size()
    res: dict[str, list[float]] = {"raw send": [], "raw recv": [], "kvtier store": [], "kvtier retrieve": []}
    out = torch.empty_like(kv)  # an engine retrieves into memory it owns (its KV cache)
    out.zero_()
    raw = RawPeer(nbytes)
    try:
        d = DaemonProcess("--cpu-size", pool).start(300)  # a loaded box starts it slowly
        try:
            eng = _engine(d.url + "?shm=0", chunk_tokens, geometry)
            eng.lookup([1])
            assert not eng.storage.tiers[0].shm  # type: ignore[attr-defined]
            for rep in range(repeat + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                raw.send()
                t_send = time.perf_counter() - t0
                t0 = time.perf_counter()
                raw.recv()
                t_recv = time.perf_counter() - t0
                toks = torch.arange(tokens) + 100_000 * (rep + 1)
                t0 = time.perf_counter()
                stored = eng.store(toks, kv)
                t_store = time.perf_counter() - t0
                t0 = time.perf_counter()
                r = eng.retrieve(toks, out=out)
                t_ret = time.perf_counter() - t0
                assert stored == tokens and r.kv is not None and torch.equal(r.kv, kv)
                for k in eng.keys(toks):
                    eng.storage.remove(k.digest)
                if rep:
                    for name, t in (
                        ("raw send", t_send),
                        ("raw recv", t_recv),
                        ("kvtier store", t_store),
                        ("kvtier retrieve", t_ret),
                    ):
                        res[name].append(nbytes / t / 1e9)
            eng.close()
        finally:
            d.__exit__(None, None, None)
    finally:
        raw.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "bytes": nbytes,
        "tokens": tokens,
        "chunk_tokens": chunk_tokens,
        "gbps": med,
        "store_x_raw": med["kvtier store"] / med["raw send"],
        "retrieve_x_raw": med["kvtier retrieve"] / med["raw recv"],
    }


def show(r: dict[str, Any]) -> str:
    g = r["gbps"]
    return (
        f"{r['bytes'] / 2**20:.0f} MiB per op ({r['tokens']} tokens, {r['chunk_tokens']}-token chunks)\n"
        f"raw socket send {g['raw send']:.2f} GB/s, recv {g['raw recv']:.2f} GB/s\n"
        f"kvtier daemon TCP store {g['kvtier store']:.2f} GB/s ({r['store_x_raw']:.2f}x raw), "
        f"retrieve {g['kvtier retrieve']:.2f} GB/s ({r['retrieve_x_raw']:.2f}x raw)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    a = ap.parse_args()
    print(show(run(a.tokens, a.repeat, a.chunk_tokens)))


if __name__ == "__main__":
    main()
