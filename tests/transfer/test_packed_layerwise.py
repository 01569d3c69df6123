"""``decode_layers``: a layer group of many packed chunks in one decode equals each chunk's own
decode, layers sliced (the CUDA source ``PackedChunkedLayerwiseKV`` runs exactly this on its side
stream; its end-to-end check is tests/gpu/test_codec_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from kvtier.serde.kvcodec import KV_CODECS, get_kv_codec
from kvtier.transfer.layout import LayoutError
from kvtier.transfer.packed_layerwise import decode_layers

SHAPE = (4, 2, 32, 2, 64)  # layers, planes, chunk tokens, heads, head_dim


def _chunks(codec_name: str, lengths: list[int]) -> list[tuple[int, torch.Tensor]]:
    codec = get_kv_codec(codec_name)
    assert codec is not None
    g = torch.Generator().manual_seed(len(lengths))
    out = []
    for n in lengths:
        kv = torch.randn(SHAPE[0], SHAPE[1], n, SHAPE[3], SHAPE[4], generator=g).to(torch.bfloat16)
        out.append((n, codec.encode(kv)))
    return out


@pytest.mark.parametrize("name", [c for c in KV_CODECS if c != "none"])
@pytest.mark.parametrize(("l0", "l1"), [(0, 4), (1, 3), (3, 4)])
def test_one_decode_per_group_equals_each_chunks_decode(name: str, l0: int, l1: int) -> None:
    codec = get_kv_codec(name)
    assert codec is not None
    chunks = _chunks(name, [32, 32, 32, 10])
    got = decode_layers(codec, SHAPE, chunks, l0, l1, torch.device("cpu"), torch.bfloat16)
    assert got.shape == (4, l1 - l0, 2, 32, 2, 64)
    for i, (n, packed) in enumerate(chunks):
        want = codec.decode(packed, (4, 2, n, 2, 64), torch.bfloat16)[l0:l1]
        assert torch.equal(got[i, :, :, :n], want)
        assert not got[i, :, :, n:].any()  # a short tail is zero-padded


def test_full_chunks_only_and_a_short_middle_chunk_is_refused() -> None:
    codec = get_kv_codec("int8")
    assert codec is not None
    chunks = _chunks("int8", [32, 32])
    got = decode_layers(codec, SHAPE, chunks, 0, 2, torch.device("cpu"), torch.float32)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 2, 32, 2, 64)
    with pytest.raises(LayoutError, match="only the last chunk"):
        decode_layers(codec, SHAPE, _chunks("int8", [32, 10, 32]), 0, 4, torch.device("cpu"), torch.float32)
