"""Quantize inside the gather, dequantize inside the scatter: lossy KV codecs fused with the move.

``gather_quant`` reads the tokens of ``slot_mapping`` out of per-layer paged caches in vLLM's
flash layout (``[2, num_blocks, block_size, heads, head_dim]``) and writes them straight into
packed chunks of a ``serde.kvcodec`` codec, ``[num_chunks, packed_nbytes]`` uint8, so only
the compressed bytes ever leave the GPU. ``scatter_dequant`` is the inverse. On CUDA with Triton
the kernels below run; elsewhere a torch path (gather by indexing, then the codec) computes the
same bytes — that path *is* the definition, and the kernels are tested bit-exact against it.

Invariants and reasons:
* Only whole chunks: ``len(slot_mapping)`` must be a multiple of ``chunk_tokens`` (and, for
  int4/int2, ``chunk_tokens`` a multiple of ``KEY_GROUP_TOKENS``); a caller moves a partial tail
  chunk through the torch codec. This keeps every program's reduction inside one chunk.
* Bit-exact with the torch codec: fp32 math with IEEE division (``div_rn``), round-half-even
  (``rint``), no add after a multiply that the compiler could fuse into an FMA, the same
  ``scale = 1`` rule for constant groups. Packed bytes therefore do not depend on the device.
* One launch per call, whatever the layer count: layers are separate allocations in vLLM, so the
  kernels find each layer's base through a small device table of offsets from the first layer
  (``quant_triton.layer_table``). With a launch per layer (two for int4/int2) a 32-layer call cost
  ~1.8 ms of host time, which paced ``quant_pipeline``'s overlapped store (H200, 2026-12-02).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.serde.kvcodec import KEY_GROUP_TOKENS, KiviCodec, KVCodec, KVCodecError, get_kv_codec


def _check(caches: Sequence[torch.Tensor], slots: torch.Tensor, codec: KVCodec, chunk_tokens: int) -> None:
    if not caches:
        raise KVCodecError("no layers given")
    c0 = caches[0]
    if c0.dim() != 5 or c0.shape[0] != 2:
        raise KVCodecError(f"caches must be [2, blocks, block_size, heads, head_dim], got {tuple(c0.shape)}")
    if any(c.shape != c0.shape or c.dtype != c0.dtype or c.device != c0.device for c in caches):
        raise KVCodecError("all layers must share one shape, dtype and device")
    codec.check(c0.dtype, int(c0.shape[4]))
    n = slots.numel()
    if chunk_tokens <= 0 or n % chunk_tokens:
        raise KVCodecError(
            f"{n} slots are not whole chunks of {chunk_tokens} tokens; move the tail separately"
        )
    if isinstance(codec, KiviCodec) and chunk_tokens % KEY_GROUP_TOKENS:
        raise KVCodecError(f"{codec.name} fused path needs chunk_tokens divisible by {KEY_GROUP_TOKENS}")


def _shape(
    caches: Sequence[torch.Tensor], chunk_tokens: int, num_layers: int
) -> tuple[int, int, int, int, int]:
    return (num_layers, 2, chunk_tokens, int(caches[0].shape[3]), int(caches[0].shape[4]))


def _layers(caches: Sequence[torch.Tensor], first_layer: int, num_layers: int | None) -> int:
    n = len(caches) if num_layers is None else num_layers
    if first_layer < 0 or first_layer + len(caches) > n:
        raise KVCodecError(
            f"layers {first_layer}..{first_layer + len(caches)} do not fit chunks of {n} layers"
        )
    return n


def _use_triton(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gather_quant(
    caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    codec_name: str,
    chunk_tokens: int,
    *,
    out: torch.Tensor | None = None,
    first_layer: int = 0,
    num_layers: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Packed chunks ``[len(slots) // chunk_tokens, packed_nbytes]`` of the slots' KV.

    ``caches`` are layers ``first_layer ..`` of chunks of ``num_layers`` layers (default: the
    given layers are all of them); only their share of ``out`` is written, so a caller that gets
    one layer at a time (vLLM's ``save_kv_layer``) fills whole chunks layer by layer with the same
    bytes as one call over all layers (the packed parts are layer-major: ``KVCodec.segments``).
    ``out``: a contiguous ``[chunks, packed_nbytes]`` uint8 tensor on the caches' device to fill
    (allocated when ``None``)."""
    codec = get_kv_codec(codec_name)
    if codec is None:
        raise KVCodecError("gather_quant needs a lossy codec, not 'none'")
    slots = slot_mapping.to(torch.int64).contiguous()
    _check(caches, slots, codec, chunk_tokens)
    n_layers = _layers(caches, first_layer, num_layers)
    shape = _shape(caches, chunk_tokens, n_layers)
    n_chunks = slots.numel() // chunk_tokens
    want = (n_chunks, codec.packed_nbytes(shape))
    if out is None:
        out = torch.empty(want, dtype=torch.uint8, device=caches[0].device)
    elif tuple(out.shape) != want or out.dtype != torch.uint8 or not out.is_contiguous():
        raise KVCodecError(f"out is {tuple(out.shape)} {out.dtype}, expected contiguous {want} uint8")
    if backend == "triton" or (backend == "auto" and _use_triton(caches[0])):
        from kvtier.transfer.kernels import quant_triton

        quant_triton.gather_quant(caches, slots, codec, chunk_tokens, out, first_layer, n_layers)
        return out
    kv = reference_gather(caches, slots)
    for i in range(n_chunks):
        part = kv[:, :, i * chunk_tokens : (i + 1) * chunk_tokens]
        if len(caches) == n_layers:
            out[i] = codec.encode(part)
            continue
        for j in range(len(caches)):  # one layer's share of each packed part
            one = codec.encode(part[j : j + 1])
            at = 0
            for a, b in codec.layer_slices(shape, first_layer + j):
                out[i, a:b] = one[at : at + b - a]
                at += b - a
    return out


def scatter_dequant(
    packed: torch.Tensor,
    caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    codec_name: str,
    chunk_tokens: int,
    *,
    first_layer: int = 0,
    num_layers: int | None = None,
    backend: str = "auto",
) -> None:
    """Write the KV of ``packed`` chunks (as from ``gather_quant``) into the slots, dequantized;
    ``caches`` are layers ``first_layer ..`` of the chunks' ``num_layers`` (as in ``gather_quant``)."""
    codec = get_kv_codec(codec_name)
    if codec is None:
        raise KVCodecError("scatter_dequant needs a lossy codec, not 'none'")
    slots = slot_mapping.to(torch.int64).contiguous()
    _check(caches, slots, codec, chunk_tokens)
    n_layers = _layers(caches, first_layer, num_layers)
    shape = _shape(caches, chunk_tokens, n_layers)
    n_chunks = slots.numel() // chunk_tokens
    if tuple(packed.shape) != (n_chunks, codec.packed_nbytes(shape)) or packed.dtype != torch.uint8:
        raise KVCodecError(
            f"packed is {tuple(packed.shape)} {packed.dtype}, expected ({n_chunks}, "
            f"{codec.packed_nbytes(shape)}) uint8"
        )
    if backend == "triton" or (backend == "auto" and _use_triton(caches[0])):
        from kvtier.transfer.kernels import quant_triton

        quant_triton.scatter_dequant(
            packed.contiguous(), caches, slots, codec, chunk_tokens, first_layer, n_layers
        )
        return
    dtype = caches[0].dtype
    one_shape = (1, *shape[1:])
    for i in range(n_chunks):
        rows = slots[i * chunk_tokens : (i + 1) * chunk_tokens]
        if len(caches) == n_layers:
            reference_scatter(codec.decode(packed[i], shape, dtype), caches, rows)
            continue
        for j, c in enumerate(caches):
            one = torch.cat([packed[i, a:b] for a, b in codec.layer_slices(shape, first_layer + j)])
            reference_scatter(codec.decode(one, one_shape, dtype), [c], rows)


def reference_gather(caches: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """``[L, 2, T, H, D]`` KV of ``slots`` from flash-layout caches (plain torch indexing)."""
    bs = caches[0].shape[2]
    blk, off = slots // bs, slots % bs
    return torch.stack([c[:, blk, off] for c in caches])


def reference_scatter(kv: torch.Tensor, caches: Sequence[torch.Tensor], slots: torch.Tensor) -> None:
    bs = caches[0].shape[2]
    blk, off = slots // bs, slots % bs
    for layer, c in enumerate(caches):
        c[:, blk, off] = kv[layer].to(c.dtype)
