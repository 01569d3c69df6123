"""Crash consistency with a real process: acknowledged-durable chunks survive SIGKILL bit-identical."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from kvtier import CacheEngine, Config

CHILD = textwrap.dedent(
    """
    import sys, torch
    from kvtier import CacheEngine, Config

    def kv(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, 2, n, 4, 64, generator=g).to(torch.bfloat16)

    def toks(n, seed):
        return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed))

    cfg = Config.load(env={}, chunk_tokens=16, cpu__max_bytes="64MiB", cpu__pin_memory="no",
                      disk__enabled=True, disk__path=sys.argv[1], model__model_id="crash",
                      model__kv_dtype="bfloat16", model__num_layers=4, model__num_kv_heads=4, model__head_dim=64)
    eng = CacheEngine(cfg)
    assert eng.store(toks(320, 1), kv(320, 1)) == 320
    assert eng.flush(60), "flush did not complete"
    print("durable", flush=True)
    seed = 100
    while True:  # keep writing: the kill lands in the middle of some write
        eng.store(toks(256, seed), kv(256, seed))
        seed += 1
    """
)


def _kv(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, n, 4, 64, generator=g).to(torch.bfloat16)


def _toks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def _engine(path: Path) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=16,
        cpu__max_bytes="64MiB",
        cpu__pin_memory="no",
        disk__enabled=True,
        disk__path=str(path),
        model__model_id="crash",
        model__kv_dtype="bfloat16",
        model__num_layers=4,
        model__num_kv_heads=4,
        model__head_dim=64,
    )
    return CacheEngine(cfg)


def test_sigkill_after_durable_flush(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "durable", (
            f"child said {line!r}; stderr: {proc.stderr.read() if not ready else ''}"
        )
        time.sleep(0.5)  # let it get into the middle of later writes
        assert proc.poll() is None, "the child died on its own"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    with _engine(cache) as eng:  # a new process image: the CPU tier is empty, only the disk remembers
        assert eng.storage.top.stats().chunks == 0
        r = eng.retrieve(_toks(320, 1))
        assert r.num_tokens == 320 and r.kv is not None
        want = _kv(320, 1)
        assert torch.equal(r.kv.view(torch.uint8), want.view(torch.uint8))
        # writes after the flush were not acknowledged as durable: each is there intact or missing
        found_later = 0
        for seed in range(100, 100 + 64):
            r = eng.retrieve(_toks(256, seed))
            if r.num_tokens:
                assert r.kv is not None
                assert torch.equal(
                    r.kv.view(torch.uint8), _kv(256, seed)[:, :, : r.num_tokens].view(torch.uint8)
                )
                found_later += 1
        assert eng.stats().fingerprint_mismatches == 0
    assert not list((cache / "tmp").iterdir()), "interrupted temp files are cleaned on start"
    print(f"later prompts found (partly or whole): {found_later}")
