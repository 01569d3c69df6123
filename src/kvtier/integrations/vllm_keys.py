"""What of a vLLM request besides its token ids changes its KV: the connector's per-request key inputs.

No vLLM import: ``request_extras`` reads the attributes of vLLM's ``Request``
(``lora_request``, ``cache_salt``, ``mm_features``, ``prompt_embeds``) by name, so the rules are
unit-tested without vLLM.

Rules and why:
* **LoRA** (``lora_request``): the adapter's name and path, as vLLM's own prefix cache keys it,
  plus a digest of the adapter's files when the path is a local directory, so an adapter
  retrained in place (same name and path, new weights) is another key, also for chunks that a
  persistent tier kept from before. ``lora_int_id`` is left out: it is a per-process handle.
* **cache salt** (``cache_salt``): folded into every chunk's key (vLLM salts only the first
  block, which its chain then carries; kvtier's keys chain the same way, but folding it into
  each is as cheap and does not depend on that).
* **multimodal** (``mm_features``): each item's ``identifier`` (vLLM's content hash of the
  image/audio, with the LoRA prefix where one applies) and its placeholder span, folded into the
  chunks the span overlaps. An identifier is a content hash only when vLLM hashed the data: with
  prefix caching off and the processor cache at 0 GiB vLLM names items by a per-process request
  counter (``renderer0-mm-1-image-0``), which a restarted process reuses for other images.
  Such requests, items without an identifier, and ``prompt_embeds`` requests (no token ids to
  key) are **not cacheable**: the connector neither loads nor saves them, and counts them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from kvtier.keys import KeyExtras, MMSpan, lora_identity

log = logging.getLogger(__name__)

_COUNTER_ID = re.compile(r"^renderer\d+-mm-\d+-[a-z_]+-\d+$")
"""vLLM's fallback name for an unhashed multimodal item (``renderers/base.py``): not content."""


@dataclass(frozen=True)
class Uncacheable:
    """A request kvtier cannot key; ``reason`` says which input (logged once per reason)."""

    reason: str


def request_extras(request: Any, *, mm_hashed: bool = True) -> KeyExtras | Uncacheable:
    """The ``KeyExtras`` of a vLLM ``Request``, or ``Uncacheable`` when an input cannot be keyed.

    ``mm_hashed``: whether this vLLM instance hashes multimodal content (``mm_ids_are_hashes``).
    """
    if getattr(request, "prompt_embeds", None) is not None:
        return Uncacheable("prompt_embeds (the KV depends on embeddings kvtier does not key)")
    mm: list[MMSpan] = []
    for f in getattr(request, "mm_features", None) or ():
        ident = getattr(f, "identifier", None)
        pos = getattr(f, "mm_position", None)
        if not ident or pos is None:
            return Uncacheable("a multimodal item without a content hash or placeholder position")
        if not mm_hashed or _COUNTER_ID.match(str(ident)):
            return Uncacheable(
                "multimodal items named by a request counter, not a content hash (vLLM hashes them only "
                "with prefix caching on or mm_processor_cache_gb > 0)"
            )
        mm.append(MMSpan(str(ident), int(pos.offset), int(pos.length)))
    lora = getattr(request, "lora_request", None)
    try:
        adapter = adapter_identity(lora) if lora is not None else ""
    except OSError as e:  # cannot tell this adapter's version from another's: never guess
        return Uncacheable(f"the LoRA adapter's files cannot be read ({e})")
    salt = getattr(request, "cache_salt", None) or ""
    return KeyExtras(adapter=adapter, salt=str(salt), mm=tuple(mm))


def mm_ids_are_hashes(vllm_config: Any) -> bool:
    """Whether vLLM names multimodal items by a hash of their content (see ``renderers/base.py``)."""
    mc = getattr(vllm_config.model_config, "multimodal_config", None)
    if mc is None:
        return True
    prefix_caching = bool(getattr(vllm_config.cache_config, "enable_prefix_caching", False))
    return prefix_caching or float(getattr(mc, "mm_processor_cache_gb", 0) or 0) > 0


def adapter_identity(lora: Any) -> str:
    """``name``, ``path`` and (for a local directory) a digest of the adapter's files
    (``keys.lora_identity``, which the daemon's ``POST /lookup`` uses too)."""
    return lora_identity(str(getattr(lora, "lora_name", "") or ""), str(getattr(lora, "lora_path", "") or ""))
