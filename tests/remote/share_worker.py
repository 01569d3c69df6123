"""Run by test_sharing.py in a fresh interpreter: ``store`` or ``retrieve`` one prompt's KV.

Usage: python share_worker.py store|retrieve URL ENDPOINT_URL SALT OUT.pt
"""

from __future__ import annotations

import sys

import torch

from kvtier import CacheEngine, Config


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 32000, (100,), generator=g)
    kv = torch.randn(3, 2, 100, 2, 8, generator=g).to(torch.bfloat16)
    return tokens, kv


def main() -> int:
    role, url, endpoint, salt, out = sys.argv[1:6]
    # NOTE: a generous timeout: this checks sharing, not speed. moto (a thread of the test process)
    # on a loaded 2-core box answered PUTs slower than the 2 s default (issue 22.11: 68 of 100 stored).
    cfg = Config.load(
        env={},
        chunk_tokens=32,
        cpu__enabled=False,
        model__model_id="share-test",
        model__cache_salt=salt,
        remote__url=url,
        remote__endpoint_url=endpoint,
        remote__timeout_s=60.0,
    )
    with CacheEngine(cfg) as eng:
        tokens, kv = prompt()
        eng.bind_model(3, 2, 8, torch.bfloat16)
        if role == "store":
            n = eng.store(tokens, kv)
            torch.save({"stored": n, "kv": kv}, out)
        else:
            res = eng.retrieve(tokens)
            torch.save({"num_tokens": res.num_tokens, "kv": res.kv, "lookup": eng.lookup(tokens)}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
