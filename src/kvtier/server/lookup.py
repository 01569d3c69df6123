"""The daemon's ``POST /lookup``: "how much of this request's prompt do you hold?", for routers.

The body names the tokens, the engine's namespace and the request's key extras; the daemon
computes the chunk keys with ``keys.chunk_keys`` exactly as the engine does and answers the
cached prefix::

    {"tokens": [1, 2, ...], "model_id": "m", "kv_dtype": "bfloat16", "kv_shape": [32, 8, 128],
     "tp_rank": 0, "tp_size": 1, "cache_salt": "", "kv_codec": "none", "kv_planes": 2,
     "chunk_tokens": 256, "allow_partial": true,
     "extras": {"salt": "tenant-7", "lora_name": "sql", "lora_path": "/adapters/sql",
                "mm": [{"identifier": "<vLLM's mm hash>", "offset": 5, "length": 576}]}}
    -> {"cached_tokens": 512, "cached_chunks": 2, "total_tokens": 700}

Why each field: a key identifies content exactly (``keys``), so every input that changes the
KV must be in the question, or the answer is the base model's / another tenant's. Top-level
fields are the engine's ``Namespace`` (``cache_salt`` there is kvtier's ``model.cache_salt``,
one per deployment); ``extras`` are the request's own (``KeyExtras``): ``salt`` is the request's
``cache_salt`` (vLLM's per-request field), the adapter is ``adapter`` (the identity string an
engine keys by) or ``lora_name`` + ``lora_path`` (the daemon derives it as vLLM's connector
does: ``keys.lora_identity``, reading the adapter directory on the daemon's host), ``inputs``
an opaque digest of other inputs, ``mm`` the multimodal items (vLLM's content hash and
placeholder span of each). Omitted extras are the bare request.

Invariants: every field is type-checked and bounded (``MAX_LOOKUP_TOKENS``, ``MAX_MM_ITEMS``,
``MAX_STR_CHARS``); a bad one is a ``LookupBodyError`` naming it (the HTTP face answers 400),
never "0 cached" for a question no store could answer.
"""

from __future__ import annotations

from typing import Any

from kvtier.chunk import DTypeError, dtype_from_name
from kvtier.config import KV_CODEC_NAMES
from kvtier.errors import KVTierError
from kvtier.keys import NO_EXTRAS, KeyExtras, MMSpan, Namespace, chunk_keys, lora_identity
from kvtier.server.service import CacheService

MAX_LOOKUP_TOKENS = 1 << 20
MAX_MM_ITEMS = 4096
MAX_STR_CHARS = 4096


class LookupBodyError(KVTierError, ValueError):
    """A ``/lookup`` body that is not what the endpoint takes."""


def lookup(service: CacheService, body: Any) -> dict[str, int]:
    """Cached prefix length of ``body['tokens']`` under the namespace and extras the body names."""
    if not isinstance(body, dict):
        raise LookupBodyError("body must be a JSON object")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or len(tokens) > MAX_LOOKUP_TOKENS:
        raise LookupBodyError(f"'tokens' must be a list of at most {MAX_LOOKUP_TOKENS} token ids")
    ns = namespace(body)
    chunk = body.get("chunk_tokens", service.config.chunk.chunk_tokens)
    if not _is_int(chunk) or not 1 <= chunk <= 1 << 20:
        raise LookupBodyError("'chunk_tokens' must be an integer in 1..1048576")
    partial = body.get("allow_partial", service.config.chunk.allow_partial_chunks)
    if not isinstance(partial, bool):
        raise LookupBodyError("'allow_partial' must be true or false")
    extras = request_extras(body.get("extras"))
    try:
        keys = chunk_keys(tokens, ns, chunk, allow_partial=partial, extras=extras)
    except (ValueError, TypeError, OverflowError) as e:
        raise LookupBodyError(f"'tokens': {e}") from e
    n = service.prefix_lookup([k.digest for k in keys])
    return {"cached_tokens": keys[n - 1].end if n else 0, "cached_chunks": n, "total_tokens": len(tokens)}


def namespace(body: dict[str, Any]) -> Namespace:
    """The engine's ``Namespace`` from the body's top-level fields."""
    shape = body.get("kv_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)):
        raise LookupBodyError("'kv_shape' must be [num_layers, num_kv_heads, head_dim] of positive integers")
    fields: dict[str, Any] = {}
    for name, typ, default in (
        ("model_id", str, None),
        ("kv_dtype", str, None),
        ("tp_rank", int, 0),
        ("tp_size", int, 1),
        ("cache_salt", str, ""),
        ("kv_codec", str, "none"),
        ("kv_planes", int, 2),
    ):
        v = body.get(name, default)
        if v is None or not isinstance(v, typ) or isinstance(v, bool):
            raise LookupBodyError(f"'{name}' must be a {typ.__name__}")
        fields[name] = v
    try:  # NOTE: an unknown dtype would make keys no store holds: an error, not "0 cached"
        dtype_from_name(fields["kv_dtype"])
    except DTypeError as e:
        raise LookupBodyError(
            f"'kv_dtype': {e} (the engine's KV dtype, e.g. bfloat16, float16, float32)"
        ) from e
    if fields["kv_codec"] not in KV_CODEC_NAMES:
        raise LookupBodyError(
            f"'kv_codec' must be one of {'|'.join(KV_CODEC_NAMES)} (the engine's chunk.kv_codec)"
        )
    if fields["kv_planes"] not in (1, 2):
        raise LookupBodyError("'kv_planes' must be 2 (key + value) or 1 (MLA latent)")
    return Namespace(kv_shape=(shape[0], shape[1], shape[2]), **fields)


def request_extras(raw: Any) -> KeyExtras:
    """The request's ``KeyExtras`` from the body's ``extras`` object (absent/null: none)."""
    if raw is None:
        return NO_EXTRAS
    if not isinstance(raw, dict):
        raise LookupBodyError("'extras' must be an object with salt, adapter|lora_name+lora_path, inputs, mm")
    unknown = sorted(set(raw) - {"salt", "adapter", "lora_name", "lora_path", "inputs", "mm"})
    if unknown:
        raise LookupBodyError(
            f"'extras': unknown fields {unknown}; it takes salt, adapter, lora_name, lora_path, inputs, mm"
        )
    salt, adapter, inputs = (_text(raw, f) for f in ("salt", "adapter", "inputs"))
    name, path = _text(raw, "lora_name"), _text(raw, "lora_path")
    if (name or path) and adapter:
        raise LookupBodyError("'extras': give either 'adapter' or 'lora_name' + 'lora_path', not both")
    if name or path:
        try:
            adapter = lora_identity(name, path)
        except OSError as e:
            raise LookupBodyError(
                f"'extras.lora_path': the adapter's files cannot be read on the daemon's host ({e}); "
                "send 'adapter' (the identity the engine keys by) instead"
            ) from e
    return KeyExtras(adapter=adapter, salt=salt, inputs=inputs, mm=_mm(raw.get("mm")))


def _mm(raw: Any) -> tuple[MMSpan, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_MM_ITEMS:
        raise LookupBodyError(f"'extras.mm' must be a list of at most {MAX_MM_ITEMS} items")
    out = []
    for i, item in enumerate(raw):
        span = _span(item)
        if span is None:
            raise LookupBodyError(
                f"'extras.mm[{i}]' must be "
                '{"identifier": non-empty str, "offset": int >= 0, "length": int > 0}'
            )
        out.append(span)
    return tuple(out)


def _span(item: Any) -> MMSpan | None:
    if not (isinstance(item, dict) and set(item) == {"identifier", "offset", "length"}):
        return None
    ident, off, n = item["identifier"], item["offset"], item["length"]
    if not (isinstance(ident, str) and 0 < len(ident) <= MAX_STR_CHARS):
        return None
    if not (_is_int(off) and _is_int(n) and off >= 0 and n > 0):
        return None
    return MMSpan(ident, off, n)


def _text(raw: dict[str, Any], name: str) -> str:
    v = raw.get(name, "")
    if not isinstance(v, str) or len(v) > MAX_STR_CHARS:
        raise LookupBodyError(f"'extras.{name}' must be a string of at most {MAX_STR_CHARS} characters")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
