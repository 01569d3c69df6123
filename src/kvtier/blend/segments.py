"""Segment KV in kvtier's tiers: a key domain of its own beside the prefix chunks.

A segment's KV is computed on its own, from position 0 with no preceding context, so it depends
on the segment's tokens and the model only. Its chunks are keyed exactly like prefix chunks
(one running xxh3 over the prefix, ``keys.chunk_keys``) but from a *segment
namespace digest*, ``blake2b("kvtier-segment-v1" || namespace.digest())``.

Invariants:
* A segment computed after a *sink* (a fixed context such as the prompt's instruction head, so its
  first token is not an attention sink of its own) is keyed with the sink's tokens in the digest:
  its KV depends on exactly (sink, segment, model), and all three are in the key.
* Never confused with prefix chunks: a prefix key's root is derived from ``namespace.digest()``,
  a segment key's from the derived digest, so the same tokens give unrelated keys in the two
  domains (short of a 128-bit collision); and since the namespace is in the derived digest,
  segments of another model, dtype, shard or salt are never served either.
* Reads are validated with the engine's own ``chunk_ok`` (tokens, shape, dtype fingerprint):
  a mismatch, a hole or a failing tier ends the hit, i.e. it is a miss and the caller computes.
* Everything goes through the engine's ``TierManager``, so segments live in every configured
  tier (CPU, disk, remote, the daemon) with the same eviction, promotion and write policies.
"""

from __future__ import annotations

import hashlib

import torch

from kvtier.blend.plan import BlendError
from kvtier.chunk import Chunk, dtype_from_name, dtype_name
from kvtier.engine import CacheEngine
from kvtier.keys import (
    DIGEST_BYTES,
    ChunkKey,
    KeyExtras,
    TokenInput,
    chunk_keys,
    fingerprint,
    tokens_to_array,
)

SEGMENT_DOMAIN = b"kvtier-segment-v1"


class SegmentStore:
    """Stores and reads segment KV (``[L, 2, n, H, D]`` computed from position 0) through ``engine``."""

    def __init__(
        self, engine: CacheEngine, extras: KeyExtras | None = None, sink: TokenInput | None = None
    ) -> None:
        """``extras``: the request's adapter identity and salt, folded into the domain digest; inputs
        whose positions are unknown (``inputs``, ``mm``) cannot be segment-keyed and are refused.
        ``sink``: the tokens every segment's KV is computed after (``segment_kv(..., sink=)``), also
        folded into the digest: KV computed after another sink, or after none, is never served."""
        ns = engine.namespace
        if ns is None:
            raise BlendError("SegmentStore needs an engine bound to a model namespace (bind_engine first)")
        self.engine = engine
        self.namespace = ns
        if extras is not None and (extras.inputs or extras.mm):
            raise BlendError(
                "segments cannot be keyed with extra model inputs (images, ...); blend text only"
            )
        ext = b"" if extras is None else f"|{extras.adapter}|{extras.salt}".encode()
        sink_arr = tokens_to_array(sink if sink is not None else []).astype("<i8")
        self.sink_tokens = int(sink_arr.size)
        if sink_arr.size:  # NOTE: no sink keeps the v1 digest, so segments stored before sinks still match
            ext += b"|sink|" + sink_arr.tobytes()
        self._digest = hashlib.blake2b(SEGMENT_DOMAIN + ns.digest() + ext, digest_size=DIGEST_BYTES).digest()

    def keys(self, tokens: TokenInput) -> list[ChunkKey]:
        """The segment-domain chunk keys of ``tokens`` (a partial last chunk included)."""
        e = self.engine
        return chunk_keys(tokens, self.namespace, e.chunk_tokens, allow_partial=True, ns_digest=self._digest)

    def lookup(self, tokens: TokenInput) -> int:
        """How many leading tokens of the segment ``tokens`` are cached."""
        keys = self.keys(tokens)
        n = self.engine.storage.prefix_lookup([k.digest for k in keys]) if keys else 0
        return keys[n - 1].end if n else 0

    def chunks(self, tokens: TokenInput) -> list[tuple[int, Chunk]]:
        """The validated chunks of the longest cached leading run of the segment, each with its first
        token's offset in the segment, still pinned in their tier: the caller ``release``s each one
        once its copies are done (``SegmentLoad`` does). A chunk failing ``chunk_ok`` ends the run."""
        arr = tokens_to_array(tokens)
        keys = self.keys(arr)
        storage = self.engine.storage
        n_avail = storage.prefix_lookup([k.digest for k in keys]) if keys else 0
        if n_avail == 0:
            return []
        out: list[tuple[int, Chunk]] = []
        ok = True
        for k, chunk in zip(keys, storage.get_prefix([k.digest for k in keys[:n_avail]])):
            ok = ok and self.engine.chunk_ok(chunk, arr, k)
            if ok:
                out.append((k.start, chunk))
            else:
                chunk.release()
        return out

    def retrieve(self, tokens: TokenInput, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The KV of the longest cached leading run of the segment, ``[L, 2, n, H, D]``, or ``None``."""
        parts: list[torch.Tensor] = []
        for _, chunk in self.chunks(tokens):
            with chunk:
                parts.append(chunk.kv.to(device or "cpu", copy=True))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def store(self, tokens: TokenInput, kv: torch.Tensor) -> int:
        """Store a segment's KV (``[L, 2, len(tokens), H, D]``, from position 0); tokens newly stored."""
        arr = tokens_to_array(tokens)
        ns = self.namespace
        want = (ns.kv_shape[0], ns.kv_planes, int(arr.size), ns.kv_shape[1], ns.kv_shape[2])
        if tuple(kv.shape) != want or dtype_name(kv.dtype) != ns.kv_dtype:
            raise BlendError(
                f"segment kv {tuple(kv.shape)} {kv.dtype} does not match the namespace: want {want} "
                f"{dtype_from_name(ns.kv_dtype)}"
            )
        keys = self.keys(arr)
        storage = self.engine.storage
        stored = 0
        for k in keys[storage.top_prefix([k.digest for k in keys]) :]:
            part = kv[:, :, k.start : k.end]
            fp = fingerprint(arr[k.start : k.end], tuple(part.shape), ns.kv_dtype)
            if storage.put(k.digest, Chunk(part, fp, k.num_tokens)):
                stored += k.num_tokens
        return stored
