"""Fused quantize-in-gather / dequantize-in-scatter (``kvtier.transfer.kernels.quant_kernels``).

CPU (CI): the torch path is the codec applied to the gathered KV, whole chunks only, clear
errors. CUDA: the Triton kernels give the torch path's bytes bit for bit, both directions.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.serde.kvcodec import KV_CODECS, KVCodecError
from kvtier.transfer.kernels.quant_kernels import gather_quant, reference_gather, scatter_dequant

NB, BS, H, D, CT = 24, 16, 2, 64, 64
CODECS = sorted(KV_CODECS)


def _setup(device: str, dtype: torch.dtype, n_layers: int = 3, n_tokens: int = 2 * CT, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    caches = [(torch.randn(2, NB, BS, H, D, generator=g) * 4).to(dtype).to(device) for _ in range(n_layers)]
    slots = torch.randperm(NB * BS, generator=g)[:n_tokens].to(device)  # scattered over blocks
    return caches, slots


@pytest.mark.parametrize("name", CODECS)
def test_torch_path_is_the_codec_on_gathered_kv(name: str) -> None:
    caches, slots = _setup("cpu", torch.bfloat16)
    packed = gather_quant(caches, slots, name, CT, backend="torch")
    kv = reference_gather(caches, slots)
    assert packed.shape == (2, KV_CODECS[name].packed_nbytes((3, 2, CT, H, D)))
    assert torch.equal(packed[1], KV_CODECS[name].encode(kv[:, :, CT:]))
    back = [torch.zeros_like(c) for c in caches]
    scatter_dequant(packed, back, slots, name, CT, backend="torch")
    want = KV_CODECS[name].decode(packed[0], (3, 2, CT, H, D), torch.bfloat16)
    assert torch.equal(reference_gather(back, slots[:CT]), want)


def test_partial_chunks_and_bad_input_are_clear_errors() -> None:
    caches, slots = _setup("cpu", torch.bfloat16)
    with pytest.raises(KVCodecError, match="whole chunks"):
        gather_quant(caches, slots[:100], "int8", CT, backend="torch")
    with pytest.raises(KVCodecError, match="divisible by 64"):
        gather_quant(caches, slots[:96], "int4", 32, backend="torch")
    with pytest.raises(KVCodecError, match="fp16/bf16/fp32"):
        gather_quant([c.to(torch.float8_e4m3fn) for c in caches], slots, "int8", CT, backend="torch")
    with pytest.raises(KVCodecError, match="expected"):
        scatter_dequant(torch.zeros(2, 7, dtype=torch.uint8), caches, slots, "int8", CT, backend="torch")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_bit_exact_with_torch(name: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    caches, slots = _setup("cuda", dtype, n_tokens=4 * CT, seed=1)
    caches[1][:, 3] = 0  # an all-zero block: scale 1 groups
    ref = gather_quant(caches, slots, name, CT, backend="torch")
    got = gather_quant(caches, slots, name, CT, backend="triton")
    assert torch.equal(ref, got), f"{(ref != got).sum().item()} of {ref.numel()} bytes differ"
    outs = []
    for backend in ("torch", "triton"):
        back = [torch.zeros_like(c) for c in caches]
        scatter_dequant(ref, back, slots, name, CT, backend=backend)
        outs.append(back)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _layer_by_layer(caches, slots, name, backend, whole):
    """Pack layer by layer into one buffer, unpack layer by layer into fresh caches."""
    n = len(caches)
    out = torch.full_like(whole, 0xAB)  # every byte must be written
    for i, c in enumerate(caches):
        gather_quant([c], slots, name, CT, out=out, first_layer=i, num_layers=n, backend=backend)
    back = [torch.zeros_like(c) for c in caches]
    for i, c in enumerate(back):
        scatter_dequant(whole, [c], slots, name, CT, first_layer=i, num_layers=n, backend=backend)
    return out, back


@pytest.mark.parametrize("name", CODECS)
def test_layer_by_layer_gives_the_bytes_of_all_layers_at_once(name: str) -> None:
    caches, slots = _setup("cpu", torch.bfloat16)
    whole = gather_quant(caches, slots, name, CT, backend="torch")
    out, back = _layer_by_layer(caches, slots, name, "torch", whole)
    assert torch.equal(out, whole)
    ref = [torch.zeros_like(c) for c in caches]
    scatter_dequant(whole, ref, slots, name, CT, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(back, ref, strict=True))
    with pytest.raises(KVCodecError, match="do not fit"):
        gather_quant(caches[:1], slots, name, CT, out=out, first_layer=3, num_layers=3, backend="torch")
    with pytest.raises(KVCodecError, match="contiguous"):
        gather_quant(caches, slots, name, CT, out=out[:, :-4], backend="torch")


@cuda
@pytest.mark.parametrize("name", CODECS)
def test_triton_layer_by_layer_bit_exact_with_torch(name: str) -> None:
    pytest.importorskip("triton")
    caches, slots = _setup("cuda", torch.bfloat16, n_tokens=4 * CT, seed=2)
    whole = gather_quant(caches, slots, name, CT, backend="torch")
    out, back = _layer_by_layer(caches, slots, name, "triton", whole)
    assert torch.equal(out, whole), f"{(out != whole).sum().item()} bytes differ"
    ref = [torch.zeros_like(c) for c in caches]
    scatter_dequant(whole, ref, slots, name, CT, backend="torch")
    for a, b in zip(back, ref, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@cuda
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_gives_nonfinite_kv_a_nonfinite_scale(name: str, bad: float) -> None:
    """Compiled kernels: ``tl.max`` drops NaN, so the scale reductions propagate it explicitly;
    a NaN/Inf element's groups get non-finite scales, the same ones as the torch codec's, and
    ``store_packed_range`` refuses the chunk. Before the fix NaN gave finite scales here."""
    pytest.importorskip("triton")
    caches, slots = _setup("cuda", torch.bfloat16, seed=5)
    blk, off = int(slots[70]) // BS, int(slots[70]) % BS  # chunk 1
    caches[2][0, blk, off, 1, 3] = bad
    caches[2][1, blk, off, 0, 9] = bad
    off0 = KV_CODECS[name].scales_offset((3, 2, CT, H, D))
    ref = gather_quant(caches, slots, name, CT, backend="torch")
    got = gather_quant(caches, slots, name, CT, backend="triton")
    bad_t, bad_r = ((~torch.isfinite(p[:, off0:].contiguous().view(torch.float32))) for p in (got, ref))
    assert bool(bad_t[1].any()) and not bool(bad_t[0].any())
    assert torch.equal(bad_t, bad_r)
    assert torch.equal(got[0], ref[0])  # the clean chunk: bit-exact as ever


@cuda
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_overlapped_store_and_load_equal_the_plain_calls(name: str) -> None:
    pytest.importorskip("triton")
    from kvtier.transfer.kernels.quant_pipeline import load_overlapped, store_overlapped

    caches, slots = _setup("cuda", torch.bfloat16, n_tokens=5 * CT, seed=3)
    want = gather_quant(caches, slots, name, CT)
    host = torch.full(tuple(want.shape), 7, dtype=torch.uint8, pin_memory=True)
    store_overlapped(caches, slots, name, CT, host, groups=3)  # uneven groups: 2 + 2 + 1 chunks
    torch.cuda.current_stream().synchronize()
    assert torch.equal(host, want.cpu())
    a, b = [torch.zeros_like(c) for c in caches], [torch.zeros_like(c) for c in caches]
    scatter_dequant(want, a, slots, name, CT)
    load_overlapped(host, b, slots, name, CT, groups=3)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@cuda
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_layer_table_built_on_one_stream_is_safe_on_another(name: str) -> None:
    """The per-layer offset table is copied to the device on the stream that first needs it and
    cached; a kernel on another stream must wait for that copy. Stream 1 is held back by a sleep
    kernel, so its table copy lands late; stream 2's gather must still give the torch bytes."""
    pytest.importorskip("triton")
    from kvtier.transfer.kernels import quant_triton

    caches, slots = _setup("cuda", torch.bfloat16, n_tokens=2 * CT, seed=4)
    ref = gather_quant(caches, slots, name, CT, backend="torch")
    quant_triton._TABLES.clear()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s1):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the table's H2D runs
        first = gather_quant(caches, slots, name, CT, backend="triton")
    with torch.cuda.stream(s2):
        second = gather_quant(caches, slots, name, CT, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(second.cpu(), ref.cpu())
    assert torch.equal(first.cpu(), ref.cpu())


@cuda
@pytest.mark.parametrize("name", ["int2", "int4"])
@pytest.mark.parametrize("value_tokens", [16, 32])
def test_triton_kivi_value_steps_are_bit_exact(name: str, value_tokens: int, monkeypatch) -> None:
    """``quant_triton.KIVI_VALUE_TOKENS`` (the candidate to recover the int4 gather's speed) changes
    no byte: a value's scale is per token."""
    pytest.importorskip("triton")
    from kvtier.transfer.kernels import quant_triton

    monkeypatch.setattr(quant_triton, "KIVI_VALUE_TOKENS", value_tokens)
    caches, slots = _setup("cuda", torch.bfloat16, n_tokens=4 * CT, seed=6)
    ref = gather_quant(caches, slots, name, CT, backend="torch")
    assert torch.equal(gather_quant(caches, slots, name, CT, backend="triton"), ref)
    outs = []
    for backend in ("torch", "triton"):
        back = [torch.zeros_like(c) for c in caches]
        scatter_dequant(ref, back, slots, name, CT, backend=backend)
        outs.append(back)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
