"""CUDA tests of the engine's GPU store/retrieve through the copy engine (issue 21, build item 2):
straight into the CPU tier's pinned pool and back, bit-exact, for packed and strided tensors."""

from __future__ import annotations

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine

L, H, D, CT = 3, 2, 16, 32


def _engine(**kw: object) -> CacheEngine:
    return CacheEngine(
        Config.load(
            env={},
            chunk_tokens=CT,
            cpu__max_bytes="64MiB",
            model__model_id="m",
            model__kv_dtype="bfloat16",
            model__num_layers=L,
            model__num_kv_heads=H,
            model__head_dim=D,
            **kw,
        )
    )


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True], ids=["packed", "strided"])
def test_store_from_gpu_and_retrieve_to_gpu_are_bit_exact(strided: bool) -> None:
    dev = torch.device("cuda")
    n = 7 * CT + 5  # 7 whole chunks and a 5-token tail chunk
    g = torch.Generator(device=dev).manual_seed(0)
    big = torch.randn((L, 2, n + 40, H, D), device=dev, generator=g, dtype=torch.bfloat16)
    kv = big[:, :, 40:] if strided else big[:, :, :n].contiguous()
    tokens = list(range(500, 500 + n))
    with _engine() as e:
        res = e.store_range(tokens, kv)
        assert res.stored_tokens == n and res.failed_chunks == 0
        assert e.store(tokens, kv) == 0  # all cached now: nothing stored twice
        host = e.retrieve(tokens)
        assert host.num_tokens == n and host.kv is not None
        assert torch.equal(host.kv, kv.cpu())
        out = torch.zeros((L, 2, n + 3, H, D), device=dev, dtype=torch.bfloat16)
        r = e.retrieve(tokens, out=out)
        torch.cuda.current_stream().synchronize()
        assert r.num_tokens == n and torch.equal(out[:, :, :n], kv)
        assert torch.count_nonzero(out[:, :, n:]) == 0  # nothing written past the hit
        assert e.storage.tiers[0].stats().chunks == 8


@pytest.mark.gpu
def test_store_from_gpu_of_more_windows_than_fit_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of one chunk: every window is committed while the next copies (the pipeline path)."""
    import kvtier.engine as engine_mod

    monkeypatch.setattr(engine_mod, "STORE_WINDOW_BYTES", 1)
    dev = torch.device("cuda")
    n = 5 * CT
    kv = torch.randn((L, 2, n, H, D), device=dev, dtype=torch.bfloat16)
    tokens = list(range(n))
    with _engine() as e:
        assert e.store(tokens, kv) == n
        r = e.retrieve(tokens, device="cuda")
        assert r.kv is not None and torch.equal(r.kv, kv)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 1 << 30], ids=["one-chunk-windows", "one-window"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_kv_stored_from_gpu_keeps_only_the_clean_prefix(
    monkeypatch: pytest.MonkeyPatch, window: int, bad: float
) -> None:
    """The NaN/Inf check of a GPU store runs beside its DMAs (``_FiniteCheck``): when it fails,
    every reservation is given back before any commit and the clean chunks before the bad one
    are stored again through the exact check; nothing from the bad chunk on is stored."""
    import kvtier.engine as engine_mod

    monkeypatch.setattr(engine_mod, "STORE_WINDOW_BYTES", window)
    dev = torch.device("cuda")
    n = 6 * CT
    kv = torch.randn((L, 2, n, H, D), device=dev, dtype=torch.bfloat16)
    kv[1, 1, 3 * CT + 7, 0, 2] = bad  # inside chunk 3
    tokens = list(range(n))
    with _engine() as e:
        res = e.store_range(tokens, kv)
        assert res.stored_tokens == 3 * CT and res.nonfinite_chunks == 3
        assert e.lookup(tokens) == 3 * CT
        assert e.storage.tiers[0].stats().chunks == 3  # the given-back reservations left nothing
        r = e.retrieve(tokens, device="cuda")
        assert r.kv is not None and torch.equal(r.kv, kv[:, :, : 3 * CT])
        kv[1, 1, 3 * CT + 7, 0, 2] = 0.0
        assert e.store(tokens, kv) == 3 * CT  # the rest once it is clean
        out = torch.zeros_like(kv)
        assert e.retrieve(tokens, out=out).num_tokens == n
        torch.cuda.current_stream().synchronize()
        assert torch.equal(out, kv)
