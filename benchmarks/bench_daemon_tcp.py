"""The daemon over TCP (the cross-host PD path, issue 16 item 4) next to its ceilings, one run.

Paths, interleaved per repetition (a noisy shared machine), the same bytes each time:

* ``in-process cpu``: ``CacheEngine.store``/``retrieve`` on the in-process CPU tier.
* ``daemon shm``: the same through ``kvtier://127.0.0.1:PORT`` (same host: shared memory).
* ``daemon tcp``: the same through ``kvtier://127.0.0.1:PORT?shm=0`` (KV over loopback TCP, what
  a client on another host gets).
* ``socket stream``: a plain Python socket to another process moving the op's bytes in one
  ``sendall`` / ``recv_into`` (preallocated buffers both sides): the ceiling of Python + loopback.
* ``socket per chunk``: the same bytes in chunk-sized frames, one round trip (ack) per chunk, as
  the daemon's protocol does.

Every engine path checks its retrieve bit-exact. This measures only (the performance issue owns
raising the TCP path). Run: ``python benchmarks/bench_daemon_tcp.py [--tokens 2048]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

import torch

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess

SOCKET_SERVER = r"""
import socket, struct, sys
size = int(sys.argv[1])
buf = bytearray(size)
buf[::4096] = b"x" * len(buf[::4096])  # touched: no first-touch faults in the timing
mv = memoryview(buf)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
hdr = bytearray(9)
while True:
    got = 0
    while got < 9:
        n = c.recv_into(memoryview(hdr)[got:])
        if not n:
            sys.exit(0)
        got += n
    op, length = hdr[:1], struct.unpack("<Q", hdr[1:])[0]
    if op == b"P":  # store: receive the bytes into the buffer, ack
        got = 0
        while got < length:
            got += c.recv_into(mv[got:length])
        c.sendall(b"k")
    else:  # retrieve: send the bytes
        c.sendall(mv[:length])
"""


class PlainSocket:
    """A client of ``SOCKET_SERVER`` in a child process."""

    def __init__(self, size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_SERVER, str(size)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def store(self, data: memoryview, frame: int) -> None:
        for at in range(0, len(data), frame):
            part = data[at : at + frame]
            self.sock.sendall(b"P" + struct.pack("<Q", len(part)))
            self.sock.sendall(part)
            if self.sock.recv(1) != b"k":
                raise ConnectionError("plain socket server: no ack")

    def retrieve(self, out: memoryview, frame: int) -> None:
        for at in range(0, len(out), frame):
            part = out[at : at + frame]
            self.sock.sendall(b"G" + struct.pack("<Q", len(part)))
            got = 0
            while got < len(part):
                n = self.sock.recv_into(part[got:])
                if not n:
                    raise ConnectionError("plain socket server closed")
                got += n

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)


def engine(args: argparse.Namespace, url: str | None) -> CacheEngine:
    over: dict[str, object] = {"chunk_tokens": args.chunk_tokens, "model__model_id": "bench-tcp"}
    if url:
        over.update(cpu__enabled=False, remote__url=url, remote__timeout_s=120.0)
    else:
        over.update(cpu__max_bytes=args.pool, cpu__pin_memory="no")
    eng = CacheEngine(Config.load(env={}, **over))
    eng.bind_model(args.layers, args.kv_heads, args.head_dim, torch.bfloat16)
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per store/retrieve (default 2048)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pool", default="2GiB")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kv = torch.randn((args.layers, 2, args.tokens, args.kv_heads, args.head_dim)).to(torch.bfloat16)
    nbytes = kv.numel() * kv.element_size()
    # a chunk's bytes as the daemon moves them: [L, 2, chunk_tokens, H, D]
    chunk_bytes = nbytes * args.chunk_tokens // args.tokens
    src = memoryview(kv.view(torch.uint8).numpy()).cast("B")
    sink = torch.empty_like(kv)
    dst = memoryview(sink.view(torch.uint8).numpy()).cast("B")
    res: dict[str, dict[str, list[float]]] = {}
    plain = PlainSocket(nbytes)

    def record(mode: str, op: str, seconds: float) -> None:
        res.setdefault(mode, {"store": [], "retrieve": []})[op].append(nbytes / seconds / 1e9)

    with DaemonProcess("--cpu-size", args.pool) as d:
        modes = {"in-process cpu": None, "daemon shm": d.url, "daemon tcp": d.url + "?shm=0"}
        engines = {m: engine(args, u) for m, u in modes.items()}
        for eng in engines.values():
            eng.lookup([1])  # connect
        assert engines["daemon shm"].storage.tiers[0].shm  # type: ignore[attr-defined]
        assert not engines["daemon tcp"].storage.tiers[0].shm  # type: ignore[attr-defined]
        for rep in range(args.repeat + 1):  # the first is a warm-up
            for i, (m, eng) in enumerate(engines.items()):
                tokens = torch.arange(args.tokens) + 100_000 * (rep + 1) + 1_000_000 * i
                t0 = time.perf_counter()
                stored = eng.store(tokens, kv)
                t_store = time.perf_counter() - t0
                t0 = time.perf_counter()
                r = eng.retrieve(tokens)
                t_ret = time.perf_counter() - t0
                assert stored == args.tokens and r.kv is not None and torch.equal(r.kv, kv)
                for k in eng.keys(tokens):  # free the space: every rep reuses warm pool memory
                    eng.storage.remove(k.digest)
                if rep:
                    record(m, "store", t_store)
                    record(m, "retrieve", t_ret)
            for m, frame in (("socket stream", nbytes), ("socket per chunk", chunk_bytes)):
                t0 = time.perf_counter()
                plain.store(src, frame)
                t_store = time.perf_counter() - t0
                t0 = time.perf_counter()
                plain.retrieve(dst, frame)
                t_ret = time.perf_counter() - t0
                if rep:
                    record(m, "store", t_store)
                    record(m, "retrieve", t_ret)
        for eng in engines.values():
            eng.close()
    plain.close()

    med = {m: {op: statistics.median(v) for op, v in ops.items()} for m, ops in res.items()}
    cpu, stream = med["in-process cpu"], med["socket stream"]
    print(
        f"{nbytes / 2**20:.0f} MiB per op ({args.tokens} tokens, bf16 {args.layers}x{args.kv_heads}x{args.head_dim}, "
        f"{args.chunk_tokens}-token chunks = {chunk_bytes / 2**20:.0f} MiB), median of {args.repeat}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'path':<18}{'store GB/s':>11}{'x cpu':>7}{'x sock':>8}{'retrieve GB/s':>15}{'x cpu':>7}{'x sock':>8}"
    )
    for m, v in med.items():
        print(
            f"{m:<18}{v['store']:>11.2f}{v['store'] / cpu['store']:>7.2f}{v['store'] / stream['store']:>8.2f}"
            f"{v['retrieve']:>15.2f}{v['retrieve'] / cpu['retrieve']:>7.2f}{v['retrieve'] / stream['retrieve']:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_gbps": med, "bytes_per_op": nbytes, "chunk_bytes": chunk_bytes}, f, indent=2)


if __name__ == "__main__":
    main()
