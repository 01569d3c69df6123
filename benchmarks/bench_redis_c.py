"""The Redis tier against ``redis-benchmark`` (the C client) with the same value size, same run
(issue 21.4).

One private ``redis-server`` (no persistence). Anchor: ``redis-benchmark -t set,get -d SIZE``
with one connection (``-c 1``, what one tier client holds per thread) and with ``--conns``
connections; GB/s = requests/s x value size. kvtier: ``CacheEngine.store`` / ``retrieve``
through a ``redis://`` remote tier only (``cpu.enabled: false``) of chunks whose stored payload
is that size (every retrieve checked bit-exact, into a preallocated ``out``). Interleaved per
round, medians. Needs redis-server and redis-benchmark (apt: redis-server redis-tools).
``run()`` returns the rows for ``bench_all.py``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

import torch

from kvtier import CacheEngine, Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_benchmark(port: int, test: str, size: int, n: int, conns: int) -> float:
    """GB/s of ``redis-benchmark -t test`` with values of ``size`` bytes."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            test,
            "-d",
            str(size),
            "-n",
            str(n),
            "-c",
            str(conns),
            "-P",
            "1",
            "--csv",
        ],  # one fixed key: a GET always finds the value SET wrote
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith(test.upper()):
            return float(cells[1]) * size / 1e9
    raise RuntimeError(f"no {test} line in redis-benchmark output: {out!r}")


def available() -> str:
    """'' if the tools are here, else why not."""
    missing = [t for t in ("redis-server", "redis-benchmark") if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed (apt-get install redis-server redis-tools)" if missing else ""


def run(chunks: int = 8, rounds: int = 5, layers: int = 8, conns: int = 4) -> dict[str, Any]:
    torch.set_num_threads(1)
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    srv = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
            "--maxmemory",
            "0",
            "--protected-mode",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        geometry = (layers, 8, 128)
        tokens = 256
        kv = torch.randn(layers, 2, tokens * chunks, 8, 128).to(torch.bfloat16)
        size = kv.nbytes // chunks
        out = torch.empty_like(kv)
        out.zero_()
        cfg = Config.load(
            env={},
            chunk_tokens=tokens,
            model__model_id="bench",
            cpu__enabled=False,
            remote__url=f"redis://127.0.0.1:{port}/0",
            remote__timeout_s=60.0,
        )
        eng = CacheEngine(cfg)
        eng.bind_model(*geometry, torch.bfloat16)
        res: dict[str, list[float]] = {}
        for rep in range(rounds + 1):
            row = {
                "redis-benchmark SET -c 1": _redis_benchmark(port, "set", size, 2 * chunks, 1),
                "redis-benchmark GET -c 1": _redis_benchmark(port, "get", size, 2 * chunks, 1),
                f"redis-benchmark SET -c {conns}": _redis_benchmark(port, "set", size, 4 * chunks, conns),
                f"redis-benchmark GET -c {conns}": _redis_benchmark(port, "get", size, 4 * chunks, conns),
            }
            toks = torch.arange(tokens * chunks) + 100_000 * (rep + 1)
            t0 = time.perf_counter()
            stored = eng.store(toks, kv)
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = eng.retrieve(toks, out=out)
            t_ret = time.perf_counter() - t0
            assert stored == toks.numel() and r.kv is not None and torch.equal(r.kv, kv)
            for k in eng.keys(toks):
                eng.storage.remove(k.digest)
            row["kvtier store (put per chunk)"] = kv.nbytes / t_store / 1e9
            row["kvtier retrieve (batched get)"] = kv.nbytes / t_ret / 1e9
            if rep:
                for k, v in row.items():
                    res.setdefault(k, []).append(v)
        eng.close()
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    best_set = max(v for k, v in med.items() if "SET" in k)
    best_get = max(v for k, v in med.items() if "GET" in k)
    return {
        "value_bytes": size,
        "chunks": chunks,
        "gbps": med,
        "store_x_c1": med["kvtier store (put per chunk)"] / med["redis-benchmark SET -c 1"],
        "retrieve_x_c1": med["kvtier retrieve (batched get)"] / med["redis-benchmark GET -c 1"],
        "store_x_best": med["kvtier store (put per chunk)"] / best_set,
        "retrieve_x_best": med["kvtier retrieve (batched get)"] / best_get,
    }


def show(r: dict[str, Any]) -> str:
    lines = [f"value {r['value_bytes'] / 2**20:.1f} MiB, {r['chunks']} chunks per op"]
    lines += [f"  {k:<34} {v:6.2f} GB/s" for k, v in r["gbps"].items()]
    lines.append(
        f"  kvtier / redis-benchmark -c 1: store {r['store_x_c1']:.2f}x, retrieve {r['retrieve_x_c1']:.2f}x; "
        f"/ best: store {r['store_x_best']:.2f}x, retrieve {r['retrieve_x_best']:.2f}x"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    why = available()
    if why:
        raise SystemExit(why)
    print(show(run(a.chunks, a.rounds, a.layers)))


if __name__ == "__main__":
    main()
