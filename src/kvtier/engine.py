"""CacheEngine: the public API — lookup, store, retrieve, stats.

KV layout at this boundary is ``[num_layers, planes, num_tokens, num_kv_heads, head_dim]`` with
planes = 2 (key, value); MLA caches use planes = 1, heads = 1, head_dim = latent. Integrations translate their engine's layout to
and from it through ``kvtier.transfer``, which the engine never imports.

Invariants:
* Keys come from ``keys.chunk_keys`` under this engine's ``Namespace``; KV stored under another
  namespace (model, dtype, shape, tp shard, salt) can never be returned. Every call that keys
  tokens takes ``extras`` (``keys.KeyExtras``: the request's LoRA adapter, cache salt,
  multimodal items); KV stored under other extras is another key and fails the fingerprint.
* ``lookup`` and ``retrieve`` return a contiguous prefix: the first chunk no tier has (or whose
  fingerprint/shape does not match on read) ends the hit.
* ``store`` validates everything before touching any tier: bad input raises ``KVError`` and
  leaves the cache unchanged.
* NaN/Inf KV is never stored: ``store`` keeps the chunks before the first non-finite one and
  refuses that chunk and every later one (they attended to it), counting them in
  ``CacheStats.nonfinite_chunks`` and warning once per engine. Non-finite KV means the serving
  engine computed garbage (overflow, a broken kernel, a bad GPU); caching it would replay a
  transient fault to every later request that shares the prefix, on every process sharing the
  store. It is not an error: the request goes on, only the cache declines. ``store_packed_range``
  (KV already quantized, e.g. on the GPU) checks the packed scales instead: every codec gives a
  group holding NaN/Inf a non-finite scale (``serde.kvcodec``), so no pass over the KV is added.
* A tier failure at run time is a miss (``TierManager``), never an exception from these calls.
* ``lookup_by_cost`` (what integrations call before loading) answers at most ``lookup``'s
  prefix: the leading chunks whose measured read cost from the tier holding them is below
  recomputing them at the model's measured prefill rate (``note_prefill``), so a slow tier or a
  short prefix is recomputed rather than loaded. ``cost.enabled: false`` makes it ``lookup``.
* With a lossy ``chunk.kv_codec`` (``serde.kvcodec``) chunks are quantized once in ``make_chunk``
  and dequantized in ``open_chunk``; tiers only ever see the packed form, the codec is in the
  namespace, and the fingerprint names the codec too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.chunk import Chunk, DTypeError, dtype_from_name, dtype_name
from kvtier.config import Config
from kvtier.devcopy import CopyQueue, aux_stream, copy_pairs
from kvtier.errors import KVTierError, StateError
from kvtier.finite import AheadChecker
from kvtier.keys import (
    DIGEST_BYTES,
    ChunkKey,
    KeyExtras,
    Namespace,
    TokenInput,
    chain_digests,
    chunk_keys,
    fingerprint,
    hit_tokens,
    keyed_tokens,
    tokens_to_array,
)
from kvtier.observability import CacheStats, Metrics
from kvtier.serde.kvcodec import KVCodec, KVCodecError, get_kv_codec
from kvtier.storage import TierManager
from kvtier.tiers.base import Tier
from kvtier.tiers.cpu import Reservation
from kvtier.tiers.factory import build_remote_tier, build_tiers
from kvtier.tiers.mirror import MirrorTier
from kvtier.tiers.speed import CostEstimate, Fit

log = logging.getLogger(__name__)


class KVError(KVTierError, ValueError):
    """KV or tokens handed to the engine do not match each other or the engine's namespace."""


class EngineStateError(StateError, KVError):
    """The engine is already bound to another namespace (make a new engine for it)."""


@dataclass
class RetrieveResult:
    """``kv`` holds the first ``num_tokens`` tokens' KV (``None`` when nothing was cached)."""

    num_tokens: int
    kv: torch.Tensor | None
    num_chunks: int = 0


@dataclass
class StoreResult:
    """What ``store_range`` did: tokens newly stored, their chunk digests, chunks a tier refused,
    and tokens skipped because the top tier already held them."""

    stored_tokens: int = 0
    stored_keys: list[bytes] = field(default_factory=list)
    failed_chunks: int = 0
    skipped_tokens: int = 0
    nonfinite_chunks: int = 0  # refused: NaN/Inf in that chunk or an earlier one of this store


@dataclass
class ChunkViews:
    """Validated chunk views of a cached prefix (``CacheEngine.retrieve_chunks``).

    ``chunks`` are in token order and contiguous from 0; ``num_tokens`` is the end of the last.
    The views pin tier memory: call ``release()`` (or use ``with``) once they are copied.
    """

    num_tokens: int
    chunks: list[tuple[ChunkKey, Chunk]]

    def release(self) -> None:
        for _, c in self.chunks:
            c.release()

    def __enter__(self) -> ChunkViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class ChunkStream:
    """``CacheEngine.iter_chunks``: the held keys of a range, and its validated chunks lazily."""

    keys: list[ChunkKey]
    chunks: Generator[tuple[ChunkKey, Chunk], None, None]

    def __iter__(self) -> Iterator[tuple[ChunkKey, Chunk]]:
        return self.chunks

    def close(self) -> None:
        self.chunks.close()


STORE_WINDOW_BYTES = 256 << 20
"""A GPU store reserves and copies this much top-tier space at a time (two windows in flight)."""
RETRIEVE_INFLIGHT_CHUNKS = 2
"""A retrieve to a GPU keeps this many chunks' copies in flight while it reads the next chunk,
then releases the oldest (after its DMA): a long prefix holds at most three of a lower tier's
read buffers, plus the ``storage.READ_AHEAD`` being read ahead (the disk's default pool holds
eight 32 MiB chunks; a smaller pool makes the excess reads fall back to fresh tensors). With one in flight the copy
engine idled ~60 us per chunk while the host validated and issued the next (0.90x memcpy)."""


class CacheEngine:
    """Stores and returns KV for token prefixes across the configured tiers."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        namespace: Namespace | None = None,
        tiers: list[Tier] | None = None,
        key_mirror: int = 0,
    ) -> None:
        """``tiers`` replaces the configured tiers; ``key_mirror`` > 0 makes this an engine that holds
        no KV itself: a ``MirrorTier`` of up to that many keys other processes report
        (``learn_keys``), then the remote tier if ``remote.url`` is set. A vLLM scheduler whose
        workers run in other processes answers "how much is cached?" with one."""
        self.config = config or Config.load()
        if key_mirror:
            tiers = [MirrorTier(key_mirror)]
            if self.config.remote.url:
                tiers.append(build_remote_tier(self.config.remote, self.config.server.auth_token_file))
        self.chunk_tokens = self.config.chunk.chunk_tokens
        self.allow_partial = self.config.chunk.allow_partial_chunks
        self.storage = TierManager(
            tiers if tiers is not None else build_tiers(self.config), self.config.storage
        )
        self._stats = CacheStats()
        self._finite = AheadChecker()
        self.metrics = Metrics(self.stats)
        self._namespace: Namespace | None = None
        self._ns_digest = b""
        self._kv_codec: KVCodec | None = None
        self._warned_nonfinite = False
        self._prefill_cost = CostEstimate()  # seconds vs tokens computed, fed by integrations
        self._skipped_at: dict[int, float] = {}  # tier index -> monotonic time it was last left out
        m = self.config.model
        if namespace is not None:
            self.bind(namespace)
        elif m.num_layers and m.num_kv_heads and m.head_dim and m.kv_dtype:
            self.bind_model(m.num_layers, m.num_kv_heads, m.head_dim, dtype_from_name(m.kv_dtype))

    # -- namespace ------------------------------------------------------------------------------
    @property
    def namespace(self) -> Namespace | None:
        return self._namespace

    def bind(self, namespace: Namespace) -> None:
        """Fix the namespace; binding again to a different one is an error (make a new engine)."""
        if self._namespace is not None and self._namespace != namespace:
            raise EngineStateError(f"engine already bound to {self._namespace}, cannot rebind to {namespace}")
        try:
            dtype_from_name(namespace.kv_dtype)
        except DTypeError as e:
            raise KVError(str(e)) from None
        if len(namespace.kv_shape) != 3 or min(namespace.kv_shape) <= 0:
            raise KVError(
                f"namespace kv_shape must be (layers, kv_heads, head_dim) > 0, got {namespace.kv_shape}"
            )
        try:
            codec = get_kv_codec(namespace.kv_codec, dtype_from_name(namespace.kv_dtype))
            if codec is not None:
                codec.check(dtype_from_name(namespace.kv_dtype), namespace.kv_shape[2])
        except KVCodecError as e:
            raise KVError(str(e)) from None
        self._kv_codec = codec
        self._namespace = namespace
        self._ns_digest = namespace.digest()

    def bind_model(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kv_dtype: torch.dtype,
        model_id: str | None = None,
        kv_planes: int = 2,
    ) -> Namespace:
        """Bind from a model's KV geometry; model id, tp and salt come from ``config.model``."""
        m = self.config.model
        ns = Namespace(
            model_id=model_id or m.model_id or "unnamed-model",
            kv_dtype=dtype_name(kv_dtype),
            kv_shape=(num_layers, num_kv_heads, head_dim),
            tp_rank=m.tp_rank,
            tp_size=m.tp_size,
            cache_salt=m.cache_salt,
            kv_planes=kv_planes,
            kv_codec=self.config.chunk.kv_codec,
        )
        self.bind(ns)
        return ns

    def keys(self, tokens: TokenInput, extras: KeyExtras | None = None) -> list[ChunkKey]:
        """The chunk keys of ``tokens`` (and the request's ``extras``) under this engine's
        namespace ([] if unbound)."""
        if self._namespace is None:
            return []
        return chunk_keys(
            tokens,
            self._namespace,
            self.chunk_tokens,
            allow_partial=self.allow_partial,
            ns_digest=self._ns_digest,
            extras=extras,
        )

    def _digests(self, arr: np.ndarray, extras: KeyExtras | None) -> tuple[list[bytes], int]:
        """The prefix keys of ``arr`` (a ``tokens_to_array`` result) and the tokens they
        cover, without ``ChunkKey`` records (a lookup needs only these); ([], 0) if unbound."""
        if self._namespace is None:
            return [], 0
        stop = keyed_tokens(arr.size, self.chunk_tokens, self.allow_partial)
        return chain_digests(arr, self._ns_digest, self.chunk_tokens, stop, extras), stop

    # -- the API --------------------------------------------------------------------------------
    def lookup(self, tokens: TokenInput, *, extras: KeyExtras | None = None) -> int:
        """Number of leading tokens whose KV is cached (a prefix, chunk-aligned except a stored tail)."""
        t0 = time.perf_counter()
        arr = tokens_to_array(tokens)
        digests, stop = self._digests(arr, extras)
        hit = hit_tokens(self.storage.prefix_lookup(digests), self.chunk_tokens, stop) if digests else 0
        s = self._stats
        s.lookups += 1
        s.lookup_tokens += int(arr.size)
        s.hit_tokens += hit
        s.hit_requests += hit > 0
        self.metrics.lookup_latency.observe(time.perf_counter() - t0)
        return hit

    # -- load or recompute ------------------------------------------------------------------------
    def note_prefill(self, num_tokens: int, seconds: float) -> None:
        """Report a real forward that computed ``num_tokens`` tokens' KV in ``seconds`` (an
        integration calls this after each prefill it times); ``lookup_by_cost`` weighs loads
        against the rate fitted from these."""
        self._prefill_cost.observe(num_tokens, seconds)

    def prefill_fit(self) -> Fit:
        """The model's prefill cost line (seconds = fixed + per token * tokens); before the first
        ``note_prefill``, the configured conservative start (``cost.prefill_start_s_per_token``)."""
        fit = self._prefill_cost.fit()
        return fit if fit is not None else Fit(0.0, self.config.cost.prefill_start_s_per_token, 0)

    def lookup_by_cost(self, tokens: TokenInput, *, extras: KeyExtras | None = None) -> int:
        """How many leading tokens are worth *loading* rather than recomputing (<= ``lookup``).

        Each chunk's load cost is predicted from the measured read line of the tier holding it
        (latency per call + bytes / bandwidth; the top tier is read in one batched call, lower
        tiers one call per chunk) and its recompute cost from the prefill rate per token. The
        answer is the prefix with the largest total saving (0 if none saves anything). A tier
        whose lookup round trip plus reads would cost more than recomputing the whole request
        even if it held every chunk is not even asked; once every ``cost.reprobe_s`` it is read once in the
        background (``TierManager.probe``) so that a tier that recovered is seen again. A tier
        never measured is asked, and its reads measured.
        """
        if not self.config.cost.enabled or self._namespace is None:
            return self.lookup(tokens, extras=extras)
        t0 = time.perf_counter()
        arr = tokens_to_array(tokens)
        keys = self.keys(arr, extras)
        per_token = self.prefill_fit().per_unit_s
        all_bytes = self._keyed_nbytes(keys[-1].end if keys else 0)
        all_saved = per_token * (keys[-1].end if keys else 0)
        fits: list[Fit | None] = []
        usable: list[int] = []
        digests = [k.digest for k in keys]
        now = time.monotonic()
        for i in range(len(self.storage.tiers)):
            fit, _ = self.storage.read_fit(i)
            fits.append(fit)
            if self._not_worth_asking(i, fit, all_bytes, len(keys), all_saved):
                self._stats.cost_skipped_tiers += 1
                if digests and now - self._skipped_at.setdefault(i, now) >= self.config.cost.reprobe_s:
                    self._skipped_at[i] = now  # re-measure it off the request's path
                    self.storage.probe(i, digests[0])
                continue
            self._skipped_at.pop(i, None)
            usable.append(i)
        where = self.storage.prefix_locate(digests, usable) if keys and usable else []
        best = gain = 0.0
        n_best = 0
        top_paid = False
        for j, (k, i) in enumerate(zip(keys, where)):
            fit = fits[i]
            load = 0.0
            if fit is not None:
                calls = 1 if i or not top_paid else 0
                top_paid = top_paid or i == 0
                load = fit.seconds(self._stored_nbytes(k.num_tokens), calls)
            gain += per_token * k.num_tokens - load
            if gain > best:
                best, n_best = gain, j + 1
        hit = keys[n_best - 1].end if n_best else 0
        s = self._stats
        s.lookups += 1
        s.lookup_tokens += int(arr.size)
        s.hit_tokens += hit
        s.hit_requests += hit > 0
        s.cost_declined_tokens += (keys[len(where) - 1].end if where else 0) - hit
        self.metrics.lookup_latency.observe(time.perf_counter() - t0)
        return hit

    def _not_worth_asking(
        self, i: int, fit: Fit | None, all_bytes: int, n_chunks: int, all_saved: float
    ) -> bool:
        """Asking tier ``i`` costs a lookup round trip, loading at least one read: if that beats
        recomputing even if the tier held every chunk, the tier is not worth asking."""
        calls = n_chunks if i else 1
        ask = self.storage.lookup_seconds(i) or 0.0
        return fit is not None and ask + fit.seconds(all_bytes, calls) >= all_saved

    def worth_asking(self, num_tokens: int) -> bool:
        """Whether ``lookup_by_cost`` of a ``num_tokens``-token request could load anything:
        ``False`` when cost is on and every tier is one ``lookup_by_cost`` would leave out
        (slower to ask and read than recomputing the whole request) with none due for its
        ``cost.reprobe_s`` re-measure. An integration that gets ``False`` may skip keying and
        looking up before its forward (the decline path's fixed cost is then ~nothing on the
        request's critical path) and key the request afterwards, for its store. A ``False`` is
        counted as a lookup that found nothing (do not call ``lookup_by_cost`` after it)."""
        if not self.config.cost.enabled or self._namespace is None or num_tokens <= 0:
            return True
        ct = self.chunk_tokens
        stop = keyed_tokens(num_tokens, ct, self.allow_partial)
        n_chunks = -(-stop // ct)
        all_bytes = self._keyed_nbytes(stop)
        all_saved = self.prefill_fit().per_unit_s * stop
        now = time.monotonic()
        for i in range(len(self.storage.tiers)):
            fit, _ = self.storage.read_fit(i)
            if not self._not_worth_asking(i, fit, all_bytes, n_chunks, all_saved):
                return True
            if now - self._skipped_at.get(i, now) >= self.config.cost.reprobe_s:
                return True  # due for its re-measure, which lookup_by_cost starts
        s = self._stats  # counted as the lookup it replaces, one that found nothing
        s.cost_skipped_tiers += len(self.storage.tiers)
        s.lookups += 1
        s.lookup_tokens += num_tokens
        return False

    def _keyed_nbytes(self, stop: int) -> int:
        """The stored bytes of all chunks of the first ``stop`` keyed tokens. NOTE: by chunk size,
        not per key: a sum over a 128k prompt's 512 keys cost 0.5 ms of a 0.85 ms lookup_by_cost."""
        full, tail = divmod(stop, self.chunk_tokens)
        return full * self._stored_nbytes(self.chunk_tokens) + (self._stored_nbytes(tail) if tail else 0)

    def _stored_nbytes(self, num_tokens: int) -> int:
        shape, dtype = self.stored_shape(num_tokens)
        n = dtype.itemsize
        for d in shape:
            n *= d
        return n

    def store(self, tokens: TokenInput, kv: torch.Tensor, *, extras: KeyExtras | None = None) -> int:
        """Store the KV of ``tokens``; returns the number of tokens newly stored.

        ``kv``: ``[num_layers, planes, len(tokens), num_kv_heads, head_dim]``, any device. Chunks
        already cached are skipped. Binds the namespace from ``kv`` if still unbound.
        """
        return self.store_range(tokens, kv, extras=extras).stored_tokens

    def store_range(
        self, tokens: TokenInput, kv: torch.Tensor, *, start: int = 0, extras: KeyExtras | None = None
    ) -> StoreResult:
        """Store the chunks of ``tokens`` that lie at or after ``start``; ``kv`` holds tokens
        ``[start, len(tokens))`` (``[layers, planes, len(tokens) - start, heads, head_dim]``).

        ``start`` must be a chunk boundary: keys are chained from token 0, so the tokens before
        ``start`` are needed for the keys but not their KV. This is what an engine that saves
        only the new part of a request (vLLM) calls.
        """
        t0 = time.perf_counter()
        arr = tokens_to_array(tokens)
        if start < 0 or start % self.chunk_tokens or start > arr.size:
            raise KVError(
                f"start={start} must be a multiple of chunk_tokens={self.chunk_tokens} within the {arr.size} tokens"
            )
        self._validate_kv(arr[start:], kv)
        keys = [k for k in self.keys(arr, extras) if k.start >= start]
        res = StoreResult()
        # Keys are chained, so cached chunks form a prefix: one batched question to the top tier
        # (one round trip when it is remote) finds them.
        skip = self.storage.top_prefix([k.digest for k in keys])
        res.skipped_tokens = sum(k.num_tokens for k in keys[:skip])
        todo = keys[skip:]

        def chunk_of(k: ChunkKey) -> Chunk:
            part = kv[:, :, k.start - start : k.end - start]  # a view; each tier copies what it keeps
            ctx = extras.context(k.start, k.end) if extras else b""
            return self.make_chunk(arr, k, part, ctx)

        if kv.device.type == "cuda":
            # the NaN/Inf sum runs on the device beside the DMAs, not before them; nothing is
            # committed before it passed (None: it failed and every reservation was given back)
            first = (
                self._put_from_device(todo, chunk_of, kv.device, lambda ev: _FiniteCheck(kv, todo, start, ev))
                if todo
                else None
            )
            clean = len(todo) if first is not None else _finite_prefix(kv, todo, start)
            oks = first if first is not None else self._put_from_device(todo[:clean], chunk_of, kv.device)
            assert oks is not None
            oks += [self.storage.put(k.digest, chunk_of(k)) for k in todo[len(oks) : clean]]
        else:  # the NaN/Inf guard one chunk ahead of the puts, on a helper thread (finite.py)
            parts = [kv[:, :, k.start - start : k.end - start] for k in todo]
            oks = self._finite.put_while_finite(
                parts, lambda i: self.storage.put(todo[i].digest, chunk_of(todo[i]))
            )
            clean = len(oks)
        if clean < len(todo):
            res.nonfinite_chunks = len(todo) - clean
            self._refuse_nonfinite(res.nonfinite_chunks, f"tokens {todo[clean].start}..{todo[clean].end}")
        for k, ok in zip(todo[:clean], oks):
            self._count_put(k, ok, res)
        return self._stored(res, t0)

    def store_packed_range(
        self, tokens: TokenInput, packed: torch.Tensor, *, start: int = 0, extras: KeyExtras | None = None
    ) -> StoreResult:
        """``store_range`` for KV already in this namespace's codec form: ``packed[i]`` is the
        packed chunk (``KVCodec.encode``) of whole chunk ``i`` from ``start``, and ``tokens`` end
        where the last one does. What a fused quantize-in-gather (``transfer.kernels.
        quant_kernels``) produces: the chunks stored are byte for byte the ones ``store_range``
        makes from the raw KV, under the same keys and fingerprints."""
        t0 = time.perf_counter()
        codec, ns = self._kv_codec, self._namespace
        if codec is None or ns is None:
            raise KVError("store_packed_range needs an engine bound with a kv_codec")
        arr = tokens_to_array(tokens)
        ct = self.chunk_tokens
        n = int(packed.shape[0]) if packed.dim() == 2 else -1
        want, dtype = self.stored_shape(ct)
        if start < 0 or start % ct or n < 0 or arr.size != start + n * ct:
            raise KVError(
                f"packed {tuple(packed.shape)} from start={start} must be whole chunks of {ct} tokens "
                f"ending at the {arr.size} tokens given"
            )
        if tuple(packed.shape[1:]) != want or packed.dtype != dtype:
            raise KVError(
                f"packed chunks are {tuple(packed.shape)} {packed.dtype}, expected (n, {want[0]}) {dtype}"
            )
        keys = [k for k in self.keys(arr, extras) if k.start >= start]
        res = StoreResult()
        skip = self.storage.top_prefix([k.digest for k in keys])
        res.skipped_tokens = sum(k.num_tokens for k in keys[:skip])
        todo = list(range(skip, len(keys)))

        def put(i: int) -> bool:
            k = keys[i]
            ctx = extras.context(k.start, k.end) if extras else b""
            fp = fingerprint(arr[k.start : k.end], self.logical_shape(ct), self._fp_dtype(), ctx)
            return self.storage.put(k.digest, Chunk(packed[i], fp, k.num_tokens))

        if codec.quantizes:
            # NaN/Inf KV gives its group a non-finite scale or offset on every codec path (torch
            # and Triton: serde.kvcodec's invariants), so the packed scales are the non-finite check
            scales = packed[skip:, codec.scales_offset(self.logical_shape(ct)) :].contiguous()
            bad = (~torch.isfinite(scales.view(torch.float32))).any(dim=1).nonzero()
            clean = int(bad[0]) if bad.numel() else len(todo)
            oks = [put(i) for i in todo[:clean]]
        else:  # the KV's own values (``kt``): the raw store's guard, one chunk ahead of the puts
            rows = packed[skip:].view(dtype_from_name(ns.kv_dtype))  # (``torch.isfinite``: 0.35 s / 159 MB)
            oks = self._finite.put_while_finite(list(rows.unbind(0)), lambda j: put(todo[j]))
            clean = len(oks)
        if clean < len(todo):
            res.nonfinite_chunks = len(todo) - clean
            k = keys[todo[clean]]
            self._refuse_nonfinite(res.nonfinite_chunks, f"tokens {k.start}..{k.end}")
        for i, ok in zip(todo[:clean], oks, strict=True):
            self._count_put(keys[i], ok, res)
        return self._stored(res, t0)

    def _count_put(self, k: ChunkKey, ok: bool, res: StoreResult) -> None:
        if ok:
            res.stored_tokens += k.num_tokens
            res.stored_keys.append(k.digest)
            self._stats.stored_chunks += 1
        else:
            res.failed_chunks += 1
            self._stats.store_failures += 1

    def _stored(self, res: StoreResult, t0: float) -> StoreResult:
        self._stats.stores += 1
        self._stats.stored_tokens += res.stored_tokens
        self.metrics.store_latency.observe(time.perf_counter() - t0)
        return res

    def _refuse_nonfinite(self, refused: int, where: str) -> None:
        """Count ``refused`` chunks not stored from the first non-finite one (``where``) on; warn once."""
        self._stats.nonfinite_chunks += refused
        msg = (
            "kv holds NaN/Inf in %s: not storing it or the %d chunks after (the engine computed "
            "non-finite attention KV; check its dtype/kernels). Counted in "
            "kvtier_nonfinite_chunks_total; this warning is shown once"
        )
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning(msg, where, refused - 1)
        else:
            log.debug(msg, where, refused - 1)

    def _put_from_device(
        self,
        keys: list[ChunkKey],
        chunk_of: Callable[[ChunkKey], Chunk],
        device: torch.device,
        finite_check: Callable[[torch.cuda.Event], _FiniteCheck] | None = None,
    ) -> list[bool] | None:
        """Put chunks whose KV is on ``device`` straight into the top tier's pinned pool: space
        is reserved per window of ``STORE_WINDOW_BYTES``, one pipelined pass of DMAs fills it
        (``kvtier.devcopy``: strided token ranges are packed on the device, the copy engine moves
        them), and window w is committed while window w+1 copies. No pageable bounce and no
        per-chunk synchronous copy. Chunks are made (fingerprinted, encoded) window by window, so
        the first DMAs start after one window's host work, not all of it. Returns the results of
        a leading part of ``keys`` (all of them, unless the top tier cannot reserve: the caller
        ``put``s the rest). On an error the reservations not yet committed are given back (after
        the DMAs writing them are done). ``finite_check``: makes the NaN/Inf check of all of
        ``keys``' KV on the device, launched once the first window's copies are queued (a
        reduction launched first took the SMs the first slot copies needed: ~0.5 ms before the
        first DMA) but ordered after the work queued before this call; it is waited for before
        the first commit and, if it failed, everything is given back and the result is ``None``. One ``CopyQueue`` carries every
        window's DMAs (one ``copy_pairs`` per window made the next window's first slot copy
        wait for the previous window's last DMA)."""
        oks: list[bool] = []
        windows: deque[tuple[torch.cuda.Event | None, list[Reservation | bool]]] = deque()
        at = 0
        queued = torch.cuda.Event()
        queued.record(torch.cuda.current_stream(device))  # the KV is final here
        finite: _FiniteCheck | None = None
        queue = CopyQueue(device)
        try:
            while at < len(keys):
                window: list[Reservation | bool] = []
                windows.append((None, window))
                nbytes, refused, ev = 0, False, None
                while at + len(window) < len(keys) and nbytes < STORE_WINDOW_BYTES:
                    k = keys[at + len(window)]
                    c = chunk_of(k)
                    r = self.storage.reserve(
                        k.digest, tuple(c.kv.shape), c.kv.dtype, c.fingerprint, c.num_tokens
                    )
                    if r is None:
                        refused = True
                        break
                    window.append(r)
                    if isinstance(r, Reservation):
                        ev = queue.copy(c.kv, r.obj.tensor)  # side-stream events: the last covers all
                    nbytes += c.nbytes
                windows[-1] = (ev, window)
                at += len(window)
                if finite_check is not None:
                    finite, finite_check = finite_check(queued), None
                if len(windows) > 1 and finite is not None:  # wait for the check before the first commit
                    if not finite.passed():
                        break
                    finite = None
                while len(windows) > 1:  # commit window w while window w+1 copies
                    oks += self._commit_window(*windows[0])
                    windows.popleft()
                if refused:
                    break
            queue.close()
            if finite is not None and not finite.passed():
                self._give_back(windows, device)
                return None
            while windows:
                oks += self._commit_window(*windows[0])
                windows.popleft()
        except BaseException:
            queue.close()
            self._give_back(windows, device)
            raise
        return oks

    def _give_back(
        self, windows: Iterable[tuple[object, list[Reservation | bool]]], device: torch.device
    ) -> None:
        """Abort the reservations not committed, once no DMA writes them any more."""
        torch.cuda.synchronize(device)
        for _, w in windows:
            for r in w:
                if isinstance(r, Reservation):
                    self.storage.abort(r)

    def _commit_window(self, ev: torch.cuda.Event | None, window: list[Reservation | bool]) -> list[bool]:
        if ev is not None:
            ev.synchronize()  # the DMAs into the reservations are done
        out = []
        while window:  # popped as committed: an error part-way leaves only the rest to abort
            r = window.pop(0)
            out.append(self.storage.commit(r) if isinstance(r, Reservation) else r)
        return out

    def first_uncached(self, tokens: TokenInput, start: int = 0, *, extras: KeyExtras | None = None) -> int:
        """The start of the first chunk at or after ``start`` that no tier holds (``len(tokens)``'s
        last chunk end when all are held): where a save of ``tokens`` has to begin. No data moves."""
        keys = [k for k in self.keys(tokens, extras) if k.end > start]
        if not keys:
            return len(tokens) if start >= len(tokens) else start
        n = self.storage.prefix_lookup([k.digest for k in keys])
        return keys[n].start if n < len(keys) else keys[-1].end

    def learn_keys(self, keys: Sequence[bytes]) -> bool:
        """Tell this engine's key mirror (``key_mirror=``) that other processes hold ``keys``;
        ``False`` if it has none."""
        learned = False
        for tier in self.storage.tiers:
            learned = tier.learn_keys(keys) or learned
        return learned

    def stored_keys(self) -> list[bytes]:
        """The digests held by every tier that can list its keys (CPU, disk); remote tiers cannot."""
        out: list[bytes] = []
        for tier in self.storage.tiers:
            out.extend(tier.keys() or [])
        return out

    def retrieve_chunks(
        self,
        tokens: TokenInput,
        *,
        start: int = 0,
        end: int | None = None,
        extras: KeyExtras | None = None,
        decode: bool = True,
    ) -> ChunkViews:
        """The validated chunks of the longest cached run of ``tokens``' chunks from the one
        holding ``start`` on, up to the one holding ``end - 1`` (default: all), not assembled.

        ``views.chunks`` begin at the chunk containing ``start`` and are contiguous; a missing or
        invalid chunk ends them; ``num_tokens`` is the end of the last (0 if none). The whole
        range is fetched with one batched call to the top tier (one round trip when it is remote).
        Each chunk's ``kv`` is ``[layers, planes, n_i, kv_heads, head_dim]`` on the host, for the
        CPU tier a pinned view into its pool, held against eviction until ``release()`` (use
        the result as a context manager). This lets a caller copy layer by layer straight from
        the pool to a GPU while it computes, instead of waiting for ``retrieve``'s one big copy.
        With a lossy ``kv_codec`` the chunks are dequantized here (fresh host tensors) unless
        ``decode=False``, which returns the packed views for ``open_chunk`` on another device.
        """
        t0 = time.perf_counter()
        views = self._views(tokens, start, end, extras, decode)
        self._stats.retrieves += 1
        self._stats.retrieved_tokens += sum(k.num_tokens for k, _ in views.chunks)
        self.metrics.retrieve_latency.observe(time.perf_counter() - t0)
        return views

    def iter_chunks(
        self,
        tokens: TokenInput,
        *,
        start: int = 0,
        end: int | None = None,
        extras: KeyExtras | None = None,
        decode: bool = True,
    ) -> ChunkStream:
        """``retrieve_chunks`` lazily: ``stream.keys`` are the keys of the range the tiers say
        they hold (one batched lookup, no data moved), and iterating the stream yields
        ``(key, chunk)`` validated one at a time, in order, stopping at the first missing or
        invalid one. So a caller can plan from the keys and start copying the first chunk
        while the next ones are fetched and checked (the vLLM worker's CUDA load: its first
        DMAs used to wait for all 128 chunks of a 32k prefix to be validated). The caller
        owns (and must ``release``) every chunk yielded; ``close()`` (or exhausting the
        stream) releases the rest."""
        arr = tokens_to_array(tokens)
        stop = arr.size if end is None else end
        keys = [k for k in self.keys(arr, extras) if k.end > start and k.start < stop]
        if not keys or self._namespace is None:
            keys = []
        n_avail = self.storage.prefix_lookup([k.digest for k in keys]) if keys else 0
        self._stats.retrieves += 1
        return ChunkStream(keys[:n_avail], self._validated(arr, keys[:n_avail], extras, decode))

    def _validated(
        self, arr: np.ndarray, keys: list[ChunkKey], extras: KeyExtras | None, decode: bool
    ) -> Generator[tuple[ChunkKey, Chunk], None, None]:
        if not keys:
            return
        chunks = self.storage.iter_prefix([k.digest for k in keys])
        try:
            for k, chunk in zip(keys, chunks):
                if not self.chunk_ok(chunk, arr, k, extras):
                    chunk.release()
                    return
                self._stats.retrieved_tokens += k.num_tokens
                yield k, self.open_chunk(chunk) if decode else chunk
        finally:
            chunks.close()

    def _views(
        self,
        tokens: TokenInput,
        start: int = 0,
        end: int | None = None,
        extras: KeyExtras | None = None,
        decode: bool = True,
    ) -> ChunkViews:
        arr = tokens_to_array(tokens)
        stop = arr.size if end is None else end
        keys = [k for k in self.keys(arr, extras) if k.end > start and k.start < stop]
        if not keys or self._namespace is None:
            return ChunkViews(0, [])
        n_avail = self.storage.prefix_lookup([k.digest for k in keys])
        if n_avail == 0:
            return ChunkViews(0, [])
        views = ChunkViews(0, [])
        ok = True
        for k, chunk in zip(keys, self.storage.get_prefix([k.digest for k in keys[:n_avail]])):
            ok = ok and self.chunk_ok(chunk, arr, k, extras)
            if ok:
                views.chunks.append((k, self.open_chunk(chunk) if decode else chunk))
                views.num_tokens = k.end
            else:
                chunk.release()
        return views

    def retrieve(
        self,
        tokens: TokenInput,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        extras: KeyExtras | None = None,
    ) -> RetrieveResult:
        """The KV of the longest cached prefix of ``tokens``, on ``device`` (default CPU).

        ``out``: a preallocated ``[layers, 2, >= len(tokens), kv_heads, head_dim]`` tensor to fill
        (the result's ``kv`` is then a view of it). Reusing one avoids the page faults of a
        fresh large host allocation, which cost more than the copy itself.
        """
        t0 = time.perf_counter()
        ns = self._namespace
        arr = tokens_to_array(tokens)
        keys = self.keys(arr, extras) if ns is not None else []
        n_avail = self.storage.prefix_lookup([k.digest for k in keys]) if keys else 0
        if n_avail == 0 or ns is None:
            self._stats.retrieves += 1
            return RetrieveResult(0, None)
        keys = keys[:n_avail]
        bound = keys[-1].end  # what the tiers say they hold; validation may end it earlier
        layers, heads, dim = ns.kv_shape
        dtype = dtype_from_name(ns.kv_dtype)
        if out is not None:
            self._validate_out(out, bound, dtype)
            dev = out.device
        else:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            # Host output is pinned when a GPU may read it: H2D from pageable memory runs at a
            # third of the pinned rate, and torch's caching host allocator makes repeated pinned
            # allocations cheap.
            pin = dev.type == "cpu" and torch.cuda.is_available()
            out = torch.empty(
                (layers, ns.kv_planes, bound, heads, dim), dtype=dtype, device=dev, pin_memory=pin
            )
        got, n_chunks = self._copy_prefix(arr, keys, extras, out)
        self._stats.retrieves += 1
        self._stats.retrieved_tokens += got
        self.metrics.retrieve_latency.observe(time.perf_counter() - t0)
        if got == 0:
            return RetrieveResult(0, None)
        return RetrieveResult(got, out[:, :, :got] if got < out.shape[2] else out, n_chunks)

    def _copy_prefix(
        self, arr: np.ndarray, keys: list[ChunkKey], extras: KeyExtras | None, out: torch.Tensor
    ) -> tuple[int, int]:
        """Copy the validated leading chunks of ``keys`` into ``out``, chunk by chunk as the
        tiers hand them out (``TierManager.iter_prefix``); returns (tokens, chunks) copied.

        To a GPU each chunk is one copy-engine transfer (``kvtier.devcopy``; a lossy codec's
        packed bytes cross and are decoded there) and its host memory is released only after
        that transfer's event completed, never before (the copy reads it asynchronously); at
        most ``RETRIEVE_INFLIGHT_CHUNKS`` + 1 are held, so a prefix longer than a disk tier's read
        buffer pool recycles its buffers instead of falling back to fresh pageable tensors."""
        dev = out.device
        cuda = dev.type == "cuda"
        ns = self._namespace
        assert ns is not None
        inflight: deque[tuple[torch.cuda.Event | None, Chunk]] = deque()
        got = n = 0
        # raw KV to host memory: a tier that receives bytes (the daemon over TCP) may put them
        # straight into ``out``'s rows; its chunk then *is* that view and the copy below is a no-op
        into = [out[:, :, k.start : k.end] for k in keys] if not cuda and self._kv_codec is None else None
        chunks = self.storage.iter_prefix([k.digest for k in keys], into=into)
        # raw KV to a GPU: one copy queue for the whole prefix, so chunk i+1's DMA does not wait
        # for chunk i's slot copy (one copy_pairs call per chunk serialised them)
        queue = CopyQueue(dev) if cuda and self._kv_codec is None else None
        try:
            for k, chunk in zip(keys, chunks):
                if not self.chunk_ok(chunk, arr, k, extras):
                    chunk.release()
                    break
                dst = out[:, :, k.start : k.end]
                ev = None
                codec = self._kv_codec
                if codec is not None:
                    shape = (ns.kv_shape[0], ns.kv_planes, k.num_tokens, ns.kv_shape[1], ns.kv_shape[2])
                    packed = chunk.kv
                    if cuda:  # the packed bytes cross, decoded on the device
                        packed = torch.empty(chunk.kv.shape, dtype=chunk.kv.dtype, device=dev)
                        ev = copy_pairs([(chunk.kv, packed)], dev)
                    dst.copy_(codec.decode(packed, shape, dst.dtype))
                elif queue is not None:
                    ev = queue.copy(chunk.kv, dst)
                else:
                    dst.copy_(chunk.kv)
                inflight.append((ev, chunk))
                got, n = k.end, n + 1
                while inflight and (inflight[0][0] is None or len(inflight) > RETRIEVE_INFLIGHT_CHUNKS):
                    _release_after(*inflight.popleft())
        finally:
            chunks.close()  # releases the top tier's chunks not handed out
            if queue is not None:
                queue.close()  # the current stream waits for every DMA
            while inflight:
                _release_after(*inflight.popleft())
        return got, n

    # -- named pages: for engines that hash their own pages (SGLang HiCache) ----------------------
    # Such an engine names each page of ``page_tokens`` tokens with its own chained hash and has
    # no token ids at the storage boundary. ``page_digests`` folds this namespace into each name,
    # so another model, dtype, shape or tp shard never sees the page; the fingerprint stored with
    # each page is taken over its digest, so a mis-filed or corrupt value is a miss on read.
    def page_digests(self, names: Sequence[str]) -> list[bytes]:
        """kvtier digests of engine-named pages under this engine's namespace (bound first)."""
        if self._namespace is None:
            raise KVError("bind a namespace (bind / bind_model) before naming pages")
        nsd = self._ns_digest
        return [
            hashlib.blake2b(nsd + b"page|" + n.encode(), digest_size=DIGEST_BYTES).digest() for n in names
        ]

    def lookup_pages(self, digests: Sequence[bytes], page_tokens: int) -> int:
        """How many leading pages of ``digests`` some tier holds (a hole ends the run)."""
        t0 = time.perf_counter()
        n = self.storage.prefix_lookup(list(digests)) if digests else 0
        s = self._stats
        s.lookups += 1
        s.lookup_tokens += len(digests) * page_tokens
        s.hit_tokens += n * page_tokens
        s.hit_requests += n > 0
        self.metrics.lookup_latency.observe(time.perf_counter() - t0)
        return n

    def store_pages(self, digests: Sequence[bytes], pages: Sequence[torch.Tensor]) -> list[bool]:
        """Store one ``[layers, planes, page_tokens, heads, head_dim]`` tensor per digest (views are
        fine: each tier copies what it keeps); per page, whether it is now held. Pages the top tier
        already holds are not written again. Bad shapes raise ``KVError`` before any write."""
        t0 = time.perf_counter()
        if len(digests) != len(pages):
            raise KVError(f"{len(digests)} page digests but {len(pages)} pages")
        for page in pages:
            self._validate_kv(np.zeros(page.shape[2] if page.dim() == 5 else 0, dtype="<u4"), page)
        skip = self.storage.top_prefix(list(digests)) if digests else 0
        ok = [True] * skip
        stored = 0
        todo = list(zip(digests[skip:], pages[skip:]))
        clean = next((i for i, (_, page) in enumerate(todo) if not _all_finite(page)), len(todo))
        if clean < len(todo):  # pages are chained too: refuse from the first non-finite one on
            self._refuse_nonfinite(len(todo) - clean, f"page {todo[clean][0].hex()}")
        for d, page in todo[:clean]:
            n = int(page.shape[2])
            fp = fingerprint(np.frombuffer(d, dtype="<u4"), tuple(page.shape), dtype_name(page.dtype))
            put = self.storage.put(d, Chunk(page, fp, n))
            ok.append(put)
            if put:
                stored += n
                self._stats.stored_chunks += 1
            else:
                self._stats.store_failures += 1
        ok += [False] * (len(todo) - clean)
        self._stats.stores += 1
        self._stats.stored_tokens += stored
        self.metrics.store_latency.observe(time.perf_counter() - t0)
        return ok

    def retrieve_pages(self, digests: Sequence[bytes], page_tokens: int) -> ChunkViews:
        """The validated leading run of held pages (one batched read), as views to copy from and
        then ``release()``; a missing or invalid page ends the run. ``ChunkViews.chunks`` pairs a
        ``ChunkKey`` (its span in pages x ``page_tokens``) with each page."""
        t0 = time.perf_counter()
        views = ChunkViews(0, [])
        ns = self._namespace
        n_avail = self.storage.prefix_lookup(list(digests)) if digests and ns is not None else 0
        if n_avail and ns is not None:
            want = (ns.kv_shape[0], ns.kv_planes, page_tokens, ns.kv_shape[1], ns.kv_shape[2])
            ok = True
            for i, (d, chunk) in enumerate(zip(digests, self.storage.get_prefix(list(digests[:n_avail])))):
                fp = fingerprint(np.frombuffer(d, dtype="<u4"), want, ns.kv_dtype)
                ok = ok and tuple(chunk.kv.shape) == want and chunk.fingerprint == fp
                if ok:
                    views.chunks.append((ChunkKey(d, i * page_tokens, (i + 1) * page_tokens), chunk))
                    views.num_tokens = (i + 1) * page_tokens
                else:
                    if len(views.chunks) == i:
                        self._stats.fingerprint_mismatches += 1
                        log.warning("page %s failed validation on read; treated as a miss", d.hex())
                    chunk.release()
        self._stats.retrieves += 1
        self._stats.retrieved_tokens += views.num_tokens
        self.metrics.retrieve_latency.observe(time.perf_counter() - t0)
        return views

    def note_uncacheable(self) -> None:
        """Count a request an integration could not key and therefore neither loaded nor stored."""
        self._stats.uncacheable_requests += 1

    def stats(self) -> CacheStats:
        """A snapshot of the engine's and every tier's counters."""
        s = CacheStats(**{k: v for k, v in vars(self._stats).items() if k != "tiers"})
        s.tiers = self.storage.stats()
        return s

    def prefetch(self, tokens: TokenInput, *, extras: KeyExtras | None = None) -> Future[int]:
        """Start loading the cached prefix of ``tokens`` from slower tiers into the CPU tier, so a
        later ``retrieve`` is served from RAM; the future gives the number of chunks loaded."""
        return self.storage.prefetch([k.digest for k in self.keys(tokens, extras)])

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until asynchronous writes to lower tiers are done and durable; ``False`` on timeout."""
        return self.storage.flush(timeout_s)

    def close(self) -> None:
        self.storage.close()
        self._finite.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation -----------------------------------------------------------------------------
    def _validate_kv(self, arr: np.ndarray, kv: torch.Tensor) -> None:
        if not isinstance(kv, torch.Tensor):
            raise KVError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dim() != 5 or kv.shape[1] not in (1, 2):
            raise KVError(
                f"kv must have shape [num_layers, 2, num_tokens, num_kv_heads, head_dim] "
                f"(planes 1 for MLA), got {tuple(kv.shape)}"
            )
        if kv.shape[2] != arr.size:
            raise KVError(f"kv covers {kv.shape[2]} tokens but {arr.size} tokens were given")
        if not kv.dtype.is_floating_point:
            raise KVError(f"kv dtype must be floating point, got {kv.dtype}")
        if self._namespace is None:
            self.bind_model(
                int(kv.shape[0]), int(kv.shape[3]), int(kv.shape[4]), kv.dtype, kv_planes=int(kv.shape[1])
            )
        ns = self._namespace
        assert ns is not None
        want = (ns.kv_shape[0], ns.kv_planes, arr.size, ns.kv_shape[1], ns.kv_shape[2])
        if tuple(kv.shape) != want:
            raise KVError(
                f"kv shape {tuple(kv.shape)} does not match the namespace {ns.model_id}: expected {want}"
            )
        if dtype_name(kv.dtype) != ns.kv_dtype:
            raise KVError(f"kv dtype {dtype_name(kv.dtype)} does not match the namespace's {ns.kv_dtype}")

    def _validate_out(self, out: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> None:
        ns = self._namespace
        assert ns is not None
        ok = (
            isinstance(out, torch.Tensor)
            and out.dim() == 5
            and (out.shape[0], out.shape[1], out.shape[3], out.shape[4])
            == (ns.kv_shape[0], ns.kv_planes, *ns.kv_shape[1:])
            and out.shape[2] >= num_tokens
        )
        if not ok:
            raise KVError(
                f"out must have shape [{ns.kv_shape[0]}, {ns.kv_planes}, >= {num_tokens}, {ns.kv_shape[1]}, {ns.kv_shape[2]}], "
                f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        if out.dtype != dtype:
            raise KVError(f"out dtype {out.dtype} does not match the namespace's {ns.kv_dtype}")

    # -- the stored form -------------------------------------------------------------------------
    def _fp_dtype(self) -> str:
        """The dtype label fingerprints carry: the KV dtype, plus the lossy codec if any."""
        ns = self._namespace
        assert ns is not None
        return ns.kv_dtype if ns.kv_codec == "none" else f"{ns.kv_dtype}+{ns.kv_codec}"

    @property
    def kv_codec(self) -> KVCodec | None:
        """The lossy codec chunks are stored in (``None``: raw KV)."""
        return self._kv_codec

    def logical_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """``[layers, planes, num_tokens, kv_heads, head_dim]``: the KV of a chunk before any codec."""
        ns = self._namespace
        assert ns is not None
        return (ns.kv_shape[0], ns.kv_planes, num_tokens, ns.kv_shape[1], ns.kv_shape[2])

    def stored_shape(self, num_tokens: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a stored chunk of ``num_tokens`` (packed uint8 under a codec)."""
        ns = self._namespace
        assert ns is not None
        shape = self.logical_shape(num_tokens)
        if self._kv_codec is None:
            return shape, dtype_from_name(ns.kv_dtype)
        return (self._kv_codec.packed_nbytes(shape),), torch.uint8

    def make_chunk(self, arr: np.ndarray, k: ChunkKey, part: torch.Tensor, context: bytes = b"") -> Chunk:
        """The stored form of ``part`` (the KV of key ``k`` of tokens ``arr``): quantized by the
        namespace's codec (on ``part``'s device, so a GPU store ships the small form) and
        fingerprinted with the logical shape, the codec and ``context`` (``KeyExtras.context``)."""
        assert self._namespace is not None
        fp = fingerprint(arr[k.start : k.end], tuple(part.shape), self._fp_dtype(), context)
        if self._kv_codec is not None:
            part = self._kv_codec.encode(part)
        return Chunk(part, fp, k.num_tokens)

    def open_chunk(self, chunk: Chunk, device: torch.device | None = None) -> Chunk:
        """``chunk`` (validated by ``chunk_ok``) as raw KV on ``device`` (default: where it is).
        Under a codec this dequantizes into a fresh tensor and releases ``chunk``; without one it
        returns ``chunk`` itself."""
        codec, ns = self._kv_codec, self._namespace
        if codec is None or ns is None:
            return chunk
        shape = (ns.kv_shape[0], ns.kv_planes, chunk.num_tokens, ns.kv_shape[1], ns.kv_shape[2])
        packed = chunk.kv if device is None else chunk.kv.to(device, non_blocking=True)
        try:
            kv = codec.decode(packed, shape, dtype_from_name(ns.kv_dtype))
        finally:
            if packed.device.type == "cuda" and chunk.kv.device.type == "cpu":
                # the H2D above may still be reading the tier's memory: not released before it ran
                torch.cuda.current_stream(packed.device).synchronize()
            chunk.release()
        return Chunk(kv, chunk.fingerprint, chunk.num_tokens)

    def chunk_ok(self, chunk: Chunk, arr: np.ndarray, k: ChunkKey, extras: KeyExtras | None = None) -> bool:
        """Whether ``chunk``, read for key ``k`` of the tokens ``arr``, is exactly what this
        namespace stored there (token count, shape, dtype, fingerprint); a failure is counted
        and logged, and the caller treats it as a miss. Integrations that read tiers directly
        (the vLLM worker) use this same check."""
        ns = self._namespace
        assert ns is not None
        stored_shape, dtype = self.stored_shape(k.num_tokens)
        logical = (ns.kv_shape[0], ns.kv_planes, k.num_tokens, ns.kv_shape[1], ns.kv_shape[2])
        ok = (
            chunk.num_tokens == k.num_tokens
            and tuple(chunk.kv.shape) == stored_shape
            and chunk.kv.dtype == dtype
            and chunk.fingerprint
            == fingerprint(
                arr[k.start : k.end],
                logical,
                self._fp_dtype(),
                extras.context(k.start, k.end) if extras else b"",
            )
        )
        if not ok:
            self._stats.fingerprint_mismatches += 1
            log.warning(
                "chunk %s failed validation on read (fingerprint/shape/dtype); treated as a miss", k.hex()
            )
        return ok


class _FiniteCheck:
    """``_finite_prefix``'s fast test (one sum over the KV of ``keys``) enqueued on the device's
    aux stream after the event ``after`` (the KV is final), so it runs beside the store's DMAs;
    ``passed()`` waits for it. Only "all finite" is answered here: on a failure the caller runs
    the exact ``_finite_prefix`` (rare: engines do not make NaN KV)."""

    def __init__(self, kv: torch.Tensor, keys: list[ChunkKey], start: int, after: torch.cuda.Event) -> None:
        dev = kv.device
        aux = aux_stream(dev)
        aux.wait_event(after)  # the current stream's work up to the store's start
        region = kv[:, :, keys[0].start - start : keys[-1].end - start]
        self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        with torch.cuda.stream(aux):
            self._flag.copy_(torch.isfinite(region.sum()), non_blocking=True)
        region.record_stream(aux)
        self._done = torch.cuda.Event()
        self._done.record(aux)

    def passed(self) -> bool:
        self._done.synchronize()
        return bool(self._flag)


def _release_after(ev: torch.cuda.Event | None, chunk: Chunk) -> None:
    """Release ``chunk``'s tier memory once the copy reading it (``ev``) is done."""
    if ev is not None:
        ev.synchronize()
    chunk.release()


def _finite_prefix(kv: torch.Tensor, keys: list[ChunkKey], start: int) -> int:
    """How many of ``keys`` (in order; ``kv`` starts at token ``start``) hold only finite KV.

    NaN/Inf anywhere makes a sum non-finite, so the fast path is one sum over the region in
    ``kv``'s dtype (about 1 ms per 32 MiB of bf16 on a CPU core, under a copy's cost; a bool
    tensor from ``isfinite`` costs 100x that). A non-finite sum may also be the overflow of
    finite values (fp16 tops out at 65504), so only then is each chunk checked: a float32
    sum, and the exact elementwise test where even that is not finite.
    """
    if not keys:
        return 0
    region = kv[:, :, keys[0].start - start : keys[-1].end - start]
    if bool(torch.isfinite(region.sum())):
        return len(keys)
    for i, k in enumerate(keys):
        if not _all_finite(kv[:, :, k.start - start : k.end - start]):
            return i
    return len(keys)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: a sum in its dtype, then in float32 (overflow of finite
    values), and only if both are non-finite the exact elementwise test."""
    return (
        bool(torch.isfinite(t.sum()))
        or bool(torch.isfinite(t.sum(dtype=torch.float32)))
        or bool(torch.isfinite(t).all())
    )
