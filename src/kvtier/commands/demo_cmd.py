"""``kvtier demo``: a store/retrieve round trip through the configured tiers, with stats.

It plays a multi-turn conversation of random token ids with synthetic KV of a small
Llama-like shape: each turn resends the history, so every turn after the first hits the cache
for its history. It checks that every retrieved tensor is bit-identical to what was stored.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvtier.commands.common import add_config_args, load_config
from kvtier.engine import CacheEngine


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the demo workload and print the cache's effect",
                       description=__doc__)  # fmt: skip
    add_config_args(p)
    p.add_argument("--turns", type=int, default=6, help="conversation turns (default 6)")
    p.add_argument("--turn-tokens", type=int, default=700, help="new tokens per turn (default 700)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args, model_id="demo-synthetic")
    layers, heads, dim = 8, 4, 64
    gen = torch.Generator().manual_seed(0)
    history = torch.empty(0, dtype=torch.int64)
    kv_all = torch.empty(layers, 2, 0, heads, dim)
    ok = True
    with CacheEngine(cfg) as engine:
        for turn in range(args.turns):
            new = torch.randint(0, 32000, (args.turn_tokens,), generator=gen)
            history = torch.cat([history, new])
            kv_all = torch.cat(
                [kv_all, torch.randn(layers, 2, new.numel(), heads, dim, generator=gen)], dim=2
            )
            t0 = time.perf_counter()
            engine.lookup(history)
            r = engine.retrieve(history)
            t_ret = time.perf_counter() - t0
            if r.kv is not None:
                ok &= torch.equal(r.kv, kv_all[:, :, : r.num_tokens])
            stored = engine.store(history, kv_all)
            print(f"turn {turn + 1}: prompt {history.numel():5d} tokens, cached {r.num_tokens:5d} "
                  f"({t_ret * 1e3:6.2f} ms), newly stored {stored:5d}")  # fmt: skip
        s = engine.stats()
    print(f"\nlookups {s.lookups}, token hit rate {s.hit_rate:.1%}, evictions {s.evictions}")
    for name, t in s.tiers.items():
        print(
            f"tier {name}: {t.chunks} chunks, {t.bytes_used / 2**20:.1f} MiB, hits {t.hits}, misses {t.misses}"
        )
    print("retrieved KV bit-identical to stored KV:", "yes" if ok else "NO")
    return 0 if ok else 1
