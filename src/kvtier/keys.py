"""Tokens -> chunks -> prefix keys: one running xxh3-128 over the prompt.

A prompt is cut into chunks of ``chunk_tokens`` tokens. Chunk ``i`` (tokens ``[s_i, e_i)``) is keyed by

    k_i = xxh3_128(root || tokens[0 : e_i]),   root = blake2b("kvtier-chain-v3" || ns || chunk_tokens || xd)

taken from one running hash state (its digest after each chunk), so a key names the *whole prefix*
up to and including chunk ``i``, not just that chunk's tokens: two prompts share key ``i`` only if
they agree on every token before ``e_i``. That is what makes a prefix lookup a walk down the key
list that stops at the first miss.

Invariants:
* H is xxh3-128 (``xxhash``, seed 0): seedless, so the same tokens and namespace give the same
  key in every process and on every machine, whatever ``PYTHONHASHSEED`` is (vLLM's own block
  hash is seeded and breaks cross-process sharing; ours must not). Why not a cryptographic hash:
  the keys are on every request's critical path (blake2b took 1.6 ms for 128k tokens, xxh3
  0.02 ms; what is left is per-chunk interpreter work), and a key is never trusted alone: every
  chunk read is checked against its blake2b ``fingerprint`` of tokens, shape and dtype.
* Why one running hash and not a chain ``h_i = H(h_{i-1} || tokens_i || ns)`` (format v2): the
  chain built a new ``bytes`` of parent, tokens and namespace per chunk; the running state takes
  each chunk as a zero-copy view and needs two C calls per chunk (update, digest), which halves
  the per-chunk cost of a 512-chunk prompt. The key is then the hash of the whole prefix, as
  strong as xxh3 of that prefix, not a composition of many hashes.
* ``chunk_tokens`` is in the root: with a running hash, engines cutting at 256 and at 512 tokens
  would otherwise give the same key to the same 512-token prefix while storing different values
  (the last 256 vs 512 tokens' KV) under it.
* The key format is versioned in the namespace digest (``KEY_FORMAT``) and the root's domain:
  chunks stored by an older format are simply never found (misses), never confused with new ones.
* Tokens are hashed as little-endian uint32 bytes (every real vocabulary fits; half the bytes
  of int64 makes hashing 2x faster), so a list, a numpy array and a torch tensor of the same
  ids hash alike.
* The namespace (model id, KV dtype, KV shape, tp rank/size, salt, lossy codec) is folded into every
  key through the root, so KV of another model, dtype, layout or tenant can never be served for this one.
* Per-request inputs that change the KV without changing the token ids — a LoRA adapter, a
  per-request cache salt, images/audio behind placeholder tokens — travel as ``KeyExtras``:
  adapter, salt and opaque input digests (``xd``) go into the root, so into every key; a
  multimodal item into the key of each chunk its placeholder span overlaps and, through the
  prefix, every later one. A chunk with items is keyed ``a_i = xxh3_128(anchor || tokens_i ||
  mm_i, seed=MM_SEED)`` (``anchor`` = the previous key, or the root), and the running hash then
  restarts from ``a_i`` (``k_j = xxh3_128(a_i || tokens[e_i : e_j])``): the separate seed keeps
  those keys out of the running hash's domain, so no token sequence can spell an item's bytes.
  Chunks before the first item keep the plain keys (the text before an image still hits).
  The extras enter the blake2b ``fingerprint`` too, so even an xxh3 collision across adapters
  or tenants is a miss. Empty extras give exactly the bare namespace's keys and fingerprints.
"""

from __future__ import annotations

import array
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash

from kvtier.errors import KVTierError

KEY_FORMAT = "kvtier-ns-v3-xxh3-run"
"""Part of every namespace digest; bump it whenever the chain or digest changes (v1: blake2b chain;
v2: xxh3 chain of parent digest + chunk tokens + namespace; v3: one running xxh3 over the prefix)."""
CHAIN_DOMAIN = b"kvtier-chain-v3"
"""The root's domain: the running hash starts from ``blake2b(CHAIN_DOMAIN || ns || chunk_tokens || xd)``."""
MM_SEED = 0x6B76_7469_6572_6D6D  # "kvtiermm"
"""xxh3 seed of the keys of chunks with multimodal items (see the module docstring)."""
DIGEST_BYTES = 16
"""128-bit keys: collision odds stay negligible for any cache size we will ever hold."""

TokenInput = (
    Sequence[int] | np.ndarray | Any
)  # Any: a torch tensor (kept out of the type to avoid importing torch)


class TokenError(KVTierError, ValueError):
    """Tokens that are not a flat sequence of ids in [0, 2**32), or a bad chunk size."""


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that decides whether stored KV is valid for a request.

    ``kv_shape`` is ``(num_layers, num_kv_heads, head_dim)``; the token axis is not part of it.
    ``kv_planes`` is 2 for key + value, 1 for a single latent (MLA: heads 1, head_dim = latent).
    """

    model_id: str
    kv_dtype: str
    kv_shape: tuple[int, int, int]
    tp_rank: int = 0
    tp_size: int = 1
    cache_salt: str = ""
    kv_planes: int = 2
    kv_codec: str = "none"
    """The lossy codec chunks are stored with (``serde.kvcodec``): quantized and raw KV never mix."""

    def digest(self) -> bytes:
        """A stable digest of every field; changes when any field changes."""
        text = "|".join(
            [
                KEY_FORMAT,
                self.model_id,
                self.kv_dtype,
                "x".join(str(d) for d in self.kv_shape),
                f"tp{self.tp_rank}/{self.tp_size}",
                self.cache_salt,
            ]
            + ([f"planes{self.kv_planes}"] if self.kv_planes != 2 else [])
            + ([f"codec{self.kv_codec}"] if self.kv_codec != "none" else [])
        )
        return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True)
class MMSpan:
    """One multimodal item: a hash of its *content* and the placeholder tokens it fills.

    The placeholder token ids are the same for every image, so without ``identifier`` two
    prompts with different images would share keys.
    """

    identifier: str
    offset: int
    length: int


@dataclass(frozen=True)
class KeyExtras:
    """What besides the tokens and the engine's ``Namespace`` changes one request's KV.

    ``adapter``: the LoRA adapter's identity ("" = the base model). ``salt``: a per-request
    cache salt (tenant isolation). ``inputs``: a digest of other model inputs whose token
    positions are unknown (e.g. pixel values in transformers): like ``adapter`` it changes every
    chunk's key. ``mm``: multimodal items with known placeholder spans, folded into the chunks
    they overlap, so the text before the first item still hits.
    """

    adapter: str = ""
    salt: str = ""
    inputs: str = ""
    mm: tuple[MMSpan, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adapter or self.salt or self.inputs or self.mm)

    def digest(self) -> bytes:
        """The digest of adapter, salt and inputs (b"" when all are empty)."""
        if not (self.adapter or self.salt or self.inputs):
            return b""
        h = hashlib.blake2b(b"kvtier-req-v1", digest_size=DIGEST_BYTES)
        for part in (self.adapter, self.salt, self.inputs):
            _put_str(h, part)
        return h.digest()

    def mm_bytes(self, start: int, end: int) -> bytes:
        """The items overlapping tokens ``[start, end)``, offsets relative to ``start`` (b"" if none)."""
        h = None
        for m in self.mm:
            if m.offset < end and m.offset + m.length > start:
                h = h or hashlib.blake2b(b"kvtier-mm-v1", digest_size=DIGEST_BYTES)
                _put_str(h, m.identifier)
                h.update(np.array([m.offset - start, m.length], dtype="<i8").tobytes())
        return h.digest() if h is not None else b""

    def context(self, start: int, end: int) -> bytes:
        """What of these extras concerns tokens ``[start, end)``: folded into that chunk's fingerprint."""
        return self.digest() + self.mm_bytes(start, end) if self else b""


NO_EXTRAS = KeyExtras()
"""A request with nothing beyond its tokens: the bare namespace's keys."""


def lora_identity(name: str, path: str) -> str:
    """A LoRA adapter's ``KeyExtras.adapter``: its name, path and (for a local directory) a digest
    of its files, so an adapter retrained in place (same name and path, new weights) is another
    key. vLLM's connector and the daemon's ``POST /lookup`` both derive it here, so a router that
    sends an adapter's name and path gets the engine's answer (when the path is a directory, the
    daemon must see the same files)."""
    return "\0".join(["lora-v1", name, path, _files_digest(path)])


_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_DIGESTS_LOCK = threading.Lock()


def _files_digest(path: str) -> str:
    """blake2b of an adapter directory's files, memoised on their names, sizes and mtimes
    (read once per adapter version, not per request). "" when the path is not a local directory
    (a hub id: vLLM's worker resolves it; kvtier then keys by name and path, as vLLM does).
    ``OSError`` when a file cannot be read."""
    d = Path(path)
    if not path or not d.is_dir():
        return ""
    files = sorted(p for p in d.iterdir() if p.is_file())
    stamp = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    key = (os.path.realpath(path), stamp)
    with _DIGESTS_LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    out = h.hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[key] = out
    return out


def _put_str(h: Any, s: str) -> None:
    """Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently."""
    b = s.encode()
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


class ChunkKey(NamedTuple):
    """The key of one chunk: its prefix digest and the token span it covers.

    A ``NamedTuple``, not a frozen dataclass: a 128k-token prompt makes 512 of them per lookup,
    and a frozen dataclass's ``__init__`` cost more than hashing the chain."""

    digest: bytes
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def hex(self) -> str:
        return self.digest.hex()


def tokens_to_array(tokens: TokenInput) -> np.ndarray:
    """Tokens as a contiguous little-endian uint32 array, from a list, numpy array or torch tensor.

    Raises ``ValueError`` for anything that is not a flat sequence of integers in [0, 2**32).
    A contiguous ``<u4`` array comes back as is (every value is in range), so a caller that
    converted once passes the array on for free.
    """
    if _LIST_U4 and type(tokens) is list:
        # NOTE: a list (what vLLM hands the connector) through ``array('I')``: 0.26 ms for 32k ids
        # against 0.80 ms for np.asarray, and the conversion raises for ids outside [0, 2**32)
        # or non-integers, which then go the general way below for its error message.
        try:
            return np.frombuffer(array.array("I", tokens), dtype=_U4)
        except (OverflowError, TypeError):
            pass
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # a torch tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"tokens must be a flat sequence of token ids, got an array of shape {arr.shape}")
    if arr.dtype == _U4 and arr.flags.c_contiguous:
        return arr
    if arr.size and arr.dtype.kind not in "iu":
        raise TokenError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and _out_of_range(arr):
        raise TokenError("tokens must be token ids in [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


_U4 = np.dtype("<u4")
_LIST_U4 = array.array("I").itemsize == 4 and sys.byteorder == "little"
"""Whether ``array('I')`` holds exactly ``<u4`` here (the list fast path of ``tokens_to_array``)."""


def _out_of_range(arr: np.ndarray) -> bool:
    """Whether any id of a non-empty integer array is outside [0, 2**32).

    NOTE: one pass instead of min and max (a 128k-token lookup pays it on every request):
    viewed as unsigned of the same width, a negative id is >= 2**(bits - 1), so one max decides
    both ends for a native signed array."""
    size, kind = arr.dtype.itemsize, arr.dtype.kind
    if kind == "u" and size <= 4:
        return False
    if not arr.dtype.isnative:
        return int(arr.min()) < 0 or int(arr.max()) >= 1 << 32
    if kind == "i":
        limit = 1 << 32 if size == 8 else 1 << (8 * size - 1)
        return int(arr.view(f"u{size}").max()) >= limit
    return int(arr.max()) >= 1 << 32


def chunk_keys(
    tokens: TokenInput,
    namespace: Namespace,
    chunk_tokens: int,
    *,
    allow_partial: bool = True,
    ns_digest: bytes | None = None,
    extras: KeyExtras | None = None,
) -> list[ChunkKey]:
    """Prefix keys for ``tokens`` cut into ``chunk_tokens``-sized chunks.

    With ``allow_partial`` the trailing partial chunk gets a key too; without it, tokens past
    the last full chunk are not covered. ``ns_digest`` lets a caller pass a precomputed
    ``namespace.digest()`` (or a key domain's digest in its place: ``blend.segments``).
    ``extras``: the request's adapter, salt and multimodal items.
    """
    arr = tokens_to_array(tokens)
    stop = keyed_tokens(arr.size, chunk_tokens, allow_partial)
    nsd = ns_digest if ns_digest is not None else namespace.digest()
    return key_records(chain_digests(arr, nsd, chunk_tokens, stop, extras), chunk_tokens, stop)


def keyed_tokens(num_tokens: int, chunk_tokens: int, allow_partial: bool) -> int:
    """How many leading tokens get keys: all with ``allow_partial``, else the full chunks'."""
    if chunk_tokens <= 0:
        raise TokenError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return num_tokens if allow_partial else num_tokens - num_tokens % chunk_tokens


def chain_root(ns_digest: bytes, chunk_tokens: int, extras_digest: bytes = b"") -> bytes:
    """Where a prompt's running hash starts: the namespace (or a blend segment domain's digest),
    the chunk size and the request's ``KeyExtras.digest()`` (b"" for none: the bare root)."""
    h = hashlib.blake2b(CHAIN_DOMAIN, digest_size=DIGEST_BYTES)
    h.update(ns_digest)
    h.update(chunk_tokens.to_bytes(8, "little"))
    h.update(extras_digest)
    return h.digest()


def chain_digests(
    arr: np.ndarray, ns_digest: bytes, chunk_tokens: int, stop: int, extras: KeyExtras | None = None
) -> list[bytes]:
    """The prefix keys of ``arr[:stop]`` (a ``tokens_to_array`` result) in chunks of
    ``chunk_tokens``: what ``chunk_keys`` returns, without the key records. A lookup needs
    only these (the records cost more to build than the keys); chunk ``i`` spans
    ``[i * chunk_tokens, min((i + 1) * chunk_tokens, stop))``."""
    root = chain_root(ns_digest, chunk_tokens, extras.digest() if extras else b"")
    if extras is not None and extras.mm:
        return _mm_digests(arr, root, chunk_tokens, stop, extras)
    full = stop - stop % chunk_tokens
    state = xxhash.xxh3_128(root)
    # numpy's stubs do not declare the buffer protocol the hasher reads rows through
    update: Callable[[Any], object] = state.update
    digest = state.digest
    # NOTE: rows of a 2-D view are zero-copy buffers; the comprehension's filter feeds each row
    # to the state (update returns None) and its body takes the digest: two C calls and no
    # bytecode beyond the loop's per chunk (0.13 ms for 512 chunks; slicing a memoryview in
    # a for loop 0.15, the v2 chain's concatenations 0.27).
    out = [digest() for row in arr[:full].reshape(-1, chunk_tokens) if update(row) is None]
    if stop > full:
        update(arr[full:stop])
        out.append(digest())
    return out


def _mm_digests(arr: np.ndarray, root: bytes, chunk_tokens: int, stop: int, extras: KeyExtras) -> list[bytes]:
    """``chain_digests`` for a request with multimodal items: a chunk its items overlap is keyed
    under ``MM_SEED`` from the previous key and restarts the running hash (module docstring)."""
    out: list[bytes] = []
    state = xxhash.xxh3_128(root)
    anchor = root
    for s in range(0, stop, chunk_tokens):
        e = min(s + chunk_tokens, stop)
        mm = extras.mm_bytes(s, e)
        if mm:
            anchor = xxhash.xxh3_128_digest(anchor + arr[s:e].tobytes() + mm, MM_SEED)
            state = xxhash.xxh3_128(anchor)
            out.append(anchor)
        else:
            state.update(arr[s:e].tobytes())
            out.append(state.digest())
    return out


def key_records(digests: list[bytes], chunk_tokens: int, stop: int) -> list[ChunkKey]:
    """``ChunkKey`` records for ``chain_digests(..., chunk_tokens, stop)``."""
    full = min(len(digests), stop // chunk_tokens)
    # NOTE: built by C-level iteration (tuple.__new__ skips NamedTuple's Python __new__):
    # 0.08 ms instead of 0.23 for 512 keys.
    out = list(
        map(
            tuple.__new__,
            repeat(ChunkKey),
            zip(digests[:full], range(0, stop, chunk_tokens), range(chunk_tokens, stop + 1, chunk_tokens)),
        )
    )
    if len(digests) > full:
        out.append(ChunkKey(digests[full], full * chunk_tokens, stop))
    return out


def hit_tokens(num_chunks: int, chunk_tokens: int, stop: int) -> int:
    """The tokens covered by the first ``num_chunks`` keys of ``chain_digests(..., stop)``."""
    return min(num_chunks * chunk_tokens, stop)


def fingerprint(tokens: np.ndarray, shape: tuple[int, ...], dtype: str, context: bytes = b"") -> bytes:
    """A short digest of one chunk's own tokens, shape and dtype, stored beside its KV.

    The prefix key already implies the tokens; the fingerprint is the independent check on
    read that turns a hash collision, a mis-filed value or a corrupt remote into a miss.
    ``context``: ``KeyExtras.context`` of the chunk (adapter, salt, its multimodal items).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(tokens, dtype="<u4").tobytes())
    h.update(("x".join(map(str, shape)) + "|" + dtype).encode())
    if context:
        h.update(b"|ctx|" + context)
    return h.digest()
