"""Lossy KV codecs on CUDA: what the GPU decodes is what the host decodes, bit for bit, and a
transformers hit under a codec is exactly the forward over the codec's round trip (issue 15).

Why: the HF integration and ``CacheEngine.retrieve(device=cuda)`` copy the *packed* bytes to the
GPU and decode them there, a path the CPU suite never runs. The codecs promise device-independent
bits (``serde.kvcodec``'s invariants), so any difference here is a defect of the device path,
not rounding; a lossy codec's distance from a fresh prefill is its quality, measured elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine, random_ids

from kvtier.bench.kv_quality import roundtrip
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import KVTierCache, LayerwiseKV, cache_to_kv
from kvtier.models import load_model

CODECS = ["int8", "fp8", "int4", "int2", "kt"]


@pytest.mark.gpu
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_decode_is_the_host_decode_bit_for_bit(codec: str) -> None:
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(4, 2, 200, 2, 64, generator=g).to(torch.bfloat16)
    tokens = list(range(200))
    cfg = Config.load(env={}, chunk__chunk_tokens=64, chunk__kv_codec=codec, cpu__pin_memory="auto")
    with CacheEngine(cfg) as eng:
        assert eng.store(tokens, kv) == 200
        host = eng.retrieve(tokens)
        dev = eng.retrieve(tokens, device="cuda")
    assert host.kv is not None and dev.kv is not None and dev.kv.device.type == "cuda"
    assert dev.num_tokens == host.num_tokens == 200
    assert torch.equal(dev.kv.cpu(), host.kv)
    assert torch.equal(host.kv, roundtrip(kv, codec, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_hf_hit_under_a_codec_is_the_forward_over_its_roundtrip(codec: str) -> None:
    """The hit (packed bytes to the GPU, decoded there layer group by layer group) has the
    logits of a forward whose prefix KV is the codec's host round trip of the miss's KV (same
    kernels, so equal up to bf16 matmul order); greedy tokens agree."""
    model = load_model("random:llama-tiny", device="cuda", dtype=torch.bfloat16).model
    ids = random_ids(301, seed=21).cuda()
    eng = make_engine(chunk_tokens=64, chunk__kv_codec=codec)
    miss = kvt.prefill(model, ids, eng)
    assert miss.hit_tokens == 0 and miss.stored_tokens > 0
    hit = kvt.prefill(model, ids, eng)
    assert hit.hit_tokens == 300
    kv = cache_to_kv(miss.cache, 300).cpu()
    ref_cache = KVTierCache(model.config, LayerwiseKV([roundtrip(kv, codec, 64)], torch.device("cuda")))
    with torch.inference_mode():
        ref = model(input_ids=ids[:, 300:], **{kvt.cache_kwarg(model): ref_cache}, use_cache=True)
    ref_logits = ref.logits[:, -1].float()
    assert torch.isfinite(hit.logits).all(), "non-finite logits from the codec hit"
    torch.testing.assert_close(hit.logits.float(), ref_logits, atol=2e-2, rtol=0)
    assert int(hit.logits.argmax()) == int(ref_logits.argmax())
    # and it is lossy: the raw prefill differs from the round trip's forward
    assert not torch.equal(full_logits(model, ids).float(), ref_logits)
    # the packed views went to the GPU straight from the pool and were given back
    assert isinstance(hit.cache, KVTierCache)
    cpu = eng.storage.tiers[0]
    assert not any(e.obj.pinned for e in cpu._entries.values())  # type: ignore[attr-defined]


@pytest.mark.gpu
def test_hf_hit_under_kt_is_the_raw_hit() -> None:
    """``kt`` is lossless: a transformers hit through its packed path (bytes to the GPU, decoded
    there) has the logits of the same hit from raw chunks, and of a full prefill."""
    model = load_model("random:llama-tiny", device="cuda", dtype=torch.bfloat16).model
    ids = random_ids(301, seed=22).cuda()
    hits = []
    for codec in ("kt", "none"):
        eng = make_engine(chunk_tokens=64, chunk__kv_codec=codec)
        assert kvt.prefill(model, ids, eng).hit_tokens == 0
        hit = kvt.prefill(model, ids, eng)
        assert hit.hit_tokens == 300
        hits.append(hit.logits.float())
    torch.testing.assert_close(hits[0], hits[1], atol=1e-3, rtol=0)
    assert int(hits[0].argmax()) == int(full_logits(model, ids).float().argmax())


@pytest.mark.gpu
@pytest.mark.parametrize("codec", CODECS)
def test_decode_layers_on_cuda_equals_the_host_per_chunk_decode(codec: str) -> None:
    """A 32k-like prefix's worth of chunks (many full + a short tail) as one group decode on the
    GPU = each chunk's own host decode, layers sliced."""
    from kvtier.serde.kvcodec import get_kv_codec
    from kvtier.transfer.packed_layerwise import decode_layers

    c = get_kv_codec(codec, torch.bfloat16)
    assert c is not None
    shape = (8, 2, 64, 2, 128)
    g = torch.Generator().manual_seed(9)
    chunks = []
    for n in [64] * 40 + [37]:
        kv = torch.randn(8, 2, n, 2, 128, generator=g).to(torch.bfloat16)
        chunks.append((n, c.encode(kv).pin_memory()))
    for l0, l1 in [(0, 4), (4, 8)]:
        with torch.cuda.stream(torch.cuda.Stream()):
            got = decode_layers(c, shape, chunks, l0, l1, torch.device("cuda"), torch.bfloat16)
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        for i, (n, packed) in enumerate(chunks):
            want = c.decode(packed, (8, 2, n, 2, 128), torch.bfloat16)[l0:l1]
            assert torch.equal(got[i, :, :, :n].cpu(), want), f"chunk {i}, layers {l0}:{l1}"
