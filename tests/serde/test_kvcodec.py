"""Lossy KV codecs: sizes, error bounds, exact edge cases, and the engine path with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.config import KV_CODEC_NAMES, SERDE_NAMES, Config, ConfigError
from kvtier.engine import CacheEngine, KVError
from kvtier.keys import Namespace
from kvtier.serde import CODECS, decode, encode
from kvtier.serde.kvcodec import KV_CODEC_NAMES as CODEC_MODULE_NAMES
from kvtier.serde.kvcodec import KV_CODECS, KiviCodec, KVCodecError, get_kv_codec
from kvtier.tiers.base import Chunk

# relative L2 error bounds on Gaussian KV (measured: fp8 0.025, int8 0.006, int4 0.09, int2 0.45)
BOUNDS = {"fp8": 0.04, "int8": 0.01, "int4": 0.12, "int2": 0.55}
RATIO = {"fp8": 0.54, "int8": 0.54, "int4": 0.33, "int2": 0.21}  # packed / bf16 bytes, D=64


def _kv(
    planes: int = 2, tokens: int = 100, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, planes, tokens, 2, 64, generator=g) * 3).to(dtype)


def test_name_lists_agree() -> None:
    assert KV_CODEC_NAMES == CODEC_MODULE_NAMES
    assert set(SERDE_NAMES) <= set(CODECS)


@pytest.mark.parametrize("name", sorted(KV_CODECS))
@pytest.mark.parametrize("planes", [2, 1])
@pytest.mark.parametrize("tokens", [100, 64, 1])
def test_roundtrip_error_and_size(name: str, planes: int, tokens: int) -> None:
    codec = KV_CODECS[name]
    kv = _kv(planes, tokens)
    packed = codec.encode(kv)
    assert packed.dtype == torch.uint8 and packed.numel() == codec.packed_nbytes(tuple(kv.shape))
    assert packed.numel() <= RATIO[name] * kv.numel() * 2 + 8 * 64 * 6  # + one key group's scales
    out = codec.decode(packed, tuple(kv.shape), kv.dtype)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    if tokens > 1:
        err = (out.float() - kv.float()).norm() / kv.float().norm()
        assert err < BOUNDS[name], err
    assert torch.equal(codec.encode(kv), packed)  # deterministic: the same KV packs the same bytes


@pytest.mark.parametrize("name", sorted(KV_CODECS))
def test_constant_and_zero_groups_are_exact(name: str) -> None:
    codec = KV_CODECS[name]
    for fill in (0.0, 1.5):
        kv = torch.full((1, 2, 70, 1, 8), fill, dtype=torch.bfloat16)
        assert torch.equal(codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype), kv)


def test_int8_per_token_scale_keeps_small_tokens() -> None:
    """A huge outlier token must not flatten its neighbours (scales are per token and head)."""
    kv = torch.full((1, 2, 4, 1, 64), 0.01)
    kv[:, :, 0] = 1000.0
    out = KV_CODECS["int8"].decode(KV_CODECS["int8"].encode(kv), tuple(kv.shape), kv.dtype)
    assert torch.allclose(out[:, :, 1:], kv[:, :, 1:], rtol=1e-2)


def test_bad_dtype_head_dim_and_packed_size_are_clear_errors() -> None:
    with pytest.raises(KVCodecError, match="fp16/bf16/fp32"):
        KV_CODECS["int4"].check(torch.float8_e4m3fn, 64)
    with pytest.raises(KVCodecError, match="divisible by 4"):
        KV_CODECS["int2"].check(torch.bfloat16, 66)
    with pytest.raises(KVCodecError, match="unknown kv_codec"):
        get_kv_codec("int3")
    packed = KV_CODECS["int8"].encode(_kv())
    with pytest.raises(KVCodecError, match="expected"):
        KV_CODECS["int8"].decode(packed[:-1], (3, 2, 100, 2, 64), torch.bfloat16)


def test_config_validates_codec_and_serde() -> None:
    assert Config.load(env={}, chunk__kv_codec="int4", disk__serde="shuffle-zstd").chunk.kv_codec == "int4"
    with pytest.raises(ConfigError, match="chunk.kv_codec"):
        Config.load(env={}, chunk__kv_codec="int3")
    with pytest.raises(ConfigError, match="disk.serde"):
        Config.load(env={}, disk__serde="brotli")


def test_codec_is_in_the_namespace() -> None:
    ns = Namespace("m", "bfloat16", (3, 2, 64))
    digests = {Namespace("m", "bfloat16", (3, 2, 64), kv_codec=c).digest() for c in KV_CODEC_NAMES}
    assert len(digests) == len(KV_CODEC_NAMES)
    assert ns.digest() == Namespace("m", "bfloat16", (3, 2, 64), kv_codec="none").digest()


def _engine(codec: str, **kw: object) -> CacheEngine:
    return CacheEngine(
        Config.load(env={}, chunk__chunk_tokens=32, chunk__kv_codec=codec, cpu__pin_memory="no", **kw)
    )


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_engine_stores_packed_and_returns_dequantized(codec: str) -> None:
    kv = _kv(tokens=80)
    tokens = list(range(80))
    with _engine(codec) as eng, _engine("none") as raw:
        assert eng.store(tokens, kv) == 80 and raw.store(tokens, kv) == 80
        used = eng.stats().tiers["cpu"].bytes_used
        # the CPU tier holds packed chunks (int4 key scales cost more on 32-token chunks)
        assert used < {"int8": 0.56, "int4": 0.4}[codec] * raw.stats().tiers["cpu"].bytes_used
        got = eng.retrieve(tokens)
        assert got.num_tokens == 80 and got.kv is not None and got.kv.dtype == kv.dtype
        err = (got.kv.float() - kv.float()).norm() / kv.float().norm()
        assert 0 < err < BOUNDS[codec]
        with eng.retrieve_chunks(tokens) as views:  # decoded views for integrations
            assert views.num_tokens == 80 and views.chunks[0][1].kv.shape == (3, 2, 32, 2, 64)
        # a raw engine on the same tiers finds nothing of the int8 engine's chunks
        shared = CacheEngine(raw.config, tiers=eng.storage.tiers)
        shared.bind_model(3, 2, 64, torch.bfloat16)
        assert shared.lookup(tokens) == 0


def test_engine_rejects_codec_for_fp8_kv() -> None:
    with _engine("int4") as eng, pytest.raises(KVError, match="fp16/bf16/fp32"):
        eng.bind_model(3, 2, 64, torch.float8_e4m3fn)


def test_packed_chunk_with_foreign_fingerprint_is_a_miss() -> None:
    """A packed chunk whose fingerprint names another codec fails validation (a miss)."""
    kv = _kv(tokens=32)
    tokens = list(range(32))
    with _engine("int8") as eng, _engine("fp8") as other:
        other.bind_model(3, 2, 64, torch.bfloat16)
        eng.bind_model(3, 2, 64, torch.bfloat16)
        k = eng.keys(tokens)[0]
        import numpy as np

        arr = np.arange(32, dtype="<u4")
        eng.storage.put(k.digest, other.make_chunk(arr, k, kv))  # same size, other codec
        assert eng.retrieve(tokens).num_tokens == 0
        assert eng.stats().fingerprint_mismatches == 1


@pytest.mark.parametrize("serde", ["shuffle-zstd", "zstd"])
def test_disk_tier_with_codec_and_serde_and_corrupt_scales(tmp_path: Path, serde: str) -> None:
    kv = _kv(tokens=64)
    tokens = list(range(64))
    kw = dict(cpu__enabled=False, disk__enabled=True, disk__path=str(tmp_path), disk__serde=serde)
    with _engine("int8", **kw) as eng:
        assert eng.store(tokens, kv) == 64 and eng.flush(30)
        ref = eng.retrieve(tokens)
        assert ref.num_tokens == 64 and ref.kv is not None
        files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1024)
        assert len(files) == 2
        data = bytearray(files[1].read_bytes())
        data[-1] ^= 0x40  # the last stored byte (compressed scales)
        files[1].write_bytes(bytes(data))
    with _engine("int8", **kw) as eng:  # reopened: the index is rebuilt from the files
        got = eng.retrieve(tokens)
        assert got.num_tokens in (0, 32)  # the corrupt chunk is a miss, never garbage KV
        assert got.kv is None or torch.equal(got.kv, ref.kv[:, :, : got.num_tokens])


def test_shuffle_zstd_roundtrip_and_beats_zstd_on_bf16() -> None:
    # bf16 KV with a realistic exponent spread: shuffled exponent bytes compress better
    kv = _kv(tokens=256)
    chunk = Chunk(kv, b"f" * 8, 256)
    blobs = {c: encode(chunk, c) for c in ("zstd", "shuffle-zstd")}
    for b in blobs.values():
        assert torch.equal(decode(b).kv, kv)
    assert len(blobs["shuffle-zstd"]) < len(blobs["zstd"])
    odd = Chunk(torch.arange(7, dtype=torch.float32), b"", 7)  # a tail shorter than an element
    assert torch.equal(decode(encode(odd, "shuffle-zstd")).kv, odd.kv)


def test_kv_codec_flag_reaches_the_config() -> None:
    import argparse

    from kvtier.cli_args import add_config_args, load_config

    p = argparse.ArgumentParser()
    add_config_args(p)
    assert load_config(p.parse_args(["--kv-codec", "int4"])).chunk.kv_codec == "int4"
    assert load_config(p.parse_args([])).chunk.kv_codec == "none"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-codec", "int3"])


@pytest.mark.parametrize("name", sorted(KV_CODECS))
@pytest.mark.parametrize("plane", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_kv_gives_its_group_a_nonfinite_scale(name: str, plane: int, bad: float) -> None:
    """A group holding NaN/Inf is never encoded as plausible numbers: the scale of that group is
    non-finite (so ``store_packed_range``'s scale check refuses the chunk); other groups keep
    their finite scales. Before the fix a NaN row got ``scale = 1`` (``NaN > 0`` is false)."""
    codec = KV_CODECS[name]
    kv = _kv(tokens=128)
    kv[1, plane, 70, 1, 5] = bad
    shape = tuple(kv.shape)
    packed, at, parts = codec.encode(kv), 0, []
    for size in codec.segments(shape):  # codes, then the fp32 scale arrays
        parts.append(packed[at : at + size])
        at += size
    if isinstance(codec, KiviCodec) and plane == 0:  # keys: per channel over 64-token groups
        scales = parts[1].view(torch.float32).view(3, 2, 2, 64)  # [L, T/64, H, D]
        group = scales[1, 70 // 64, 1, 5]
    elif isinstance(codec, KiviCodec):  # values: per token & head
        scales = parts[3].view(torch.float32).view(3, 128, 2)
        group = scales[1, 70, 1]
    else:
        scales = parts[1].view(torch.float32).view(3, 2, 128, 2)
        group = scales[1, plane, 70, 1]
    assert not bool(torch.isfinite(group))
    assert int((~torch.isfinite(scales)).sum()) == 1
