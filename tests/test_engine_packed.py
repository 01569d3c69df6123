"""``CacheEngine.store_packed_range``: chunks already in the codec's packed form (from a fused
quantize-in-gather) are stored exactly as ``store_range`` stores the raw KV; bad input is a clear
``KVError``."""

from __future__ import annotations

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine, KVError
from kvtier.keys import Namespace

L, H, D, CT = 2, 2, 32, 32


def engine(codec: str) -> CacheEngine:
    cfg = Config.load(env={}, chunk__chunk_tokens=CT, chunk__kv_codec=codec, cpu__pin_memory="no")
    return CacheEngine(cfg, namespace=Namespace("m", "float16", (L, H, D), kv_codec=codec))


def test_packed_store_equals_raw_store_from_a_chunk_boundary() -> None:
    toks = list(range(3 * CT))
    kv = torch.randn(L, 2, 3 * CT, H, D).to(torch.float16)
    raw, packed = engine("int4"), engine("int4")
    assert raw.store(toks, kv) == 3 * CT
    codec = packed.kv_codec
    assert codec is not None
    rows = torch.stack([codec.encode(kv[:, :, i * CT : (i + 1) * CT]) for i in range(3)])
    assert packed.store(toks[:CT], kv[:, :, :CT]) == CT  # the first chunk: already held, skipped
    res = packed.store_packed_range(toks, rows[1:], start=CT)
    assert res.stored_tokens == 2 * CT and res.skipped_tokens == 0
    assert packed.store_packed_range(toks, rows[1:], start=CT).skipped_tokens == 2 * CT
    a, b = raw.retrieve(toks).kv, packed.retrieve(toks).kv
    assert a is not None and b is not None and torch.equal(a, b)


def test_bad_packed_input_is_a_clear_error() -> None:
    toks = list(range(2 * CT))
    eng = engine("int8")
    (n,), _ = eng.stored_shape(CT)
    with pytest.raises(KVError, match="needs an engine bound with a kv_codec"):
        engine("none").store_packed_range(toks, torch.zeros(2, n, dtype=torch.uint8))
    with pytest.raises(KVError, match="whole chunks"):
        eng.store_packed_range(toks[:-1], torch.zeros(2, n, dtype=torch.uint8))
    with pytest.raises(KVError, match="expected"):
        eng.store_packed_range(toks, torch.zeros(2, n + 4, dtype=torch.uint8))


@pytest.mark.parametrize("codec_name", ["fp8", "int8", "int4", "int2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_packed_chunk_of_nonfinite_kv_is_refused_and_counted(codec_name: str, bad: float) -> None:
    """The fused save path (quantize in the gather, then ``store_packed_range``) never sees the
    raw KV, so its only guard is the packed scales: a chunk quantized from NaN/Inf KV is refused
    with the chunks after it (keys are chained), counted, and the chunks before it are stored.
    Before the fix a NaN row was packed with ``scale = 1`` and stored as plausible numbers."""
    toks = list(range(3 * CT))
    kv = torch.randn(L, 2, 3 * CT, H, D).to(torch.float16)
    kv[1, 1, CT + 5, 0, 7] = bad  # in chunk 1
    eng = engine(codec_name)
    codec = eng.kv_codec
    assert codec is not None
    rows = torch.stack([codec.encode(kv[:, :, i * CT : (i + 1) * CT]) for i in range(3)])
    res = eng.store_packed_range(toks, rows)
    assert (res.stored_tokens, res.nonfinite_chunks) == (CT, 2)
    assert eng.stats().nonfinite_chunks == 2
    assert eng.retrieve(toks).num_tokens == CT  # a miss from chunk 1 on: the request recomputes
