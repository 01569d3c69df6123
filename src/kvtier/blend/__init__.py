"""Non-prefix KV reuse (CacheBlend): reuse a document's KV wherever it appears in a prompt.

* ``plan``: segment spans (explicit or split on a separator) and their validation.
* ``segments``: segment KV in the tiers under a key domain of its own.
* ``rope``: re-rotation of cached keys to new positions with the model's own rope tables.
* ``forward``: the layer driver that recomputes the most-deviating reused tokens.
* ``prefill``: one blended prefill end to end (what ``integrations.transformers`` calls).
"""

from kvtier.blend.plan import BlendError, check_ratio, check_segments, split_on_separator
from kvtier.blend.rope import RopeSpec, rerotate_keys, rerotate_kv, rope_spec
from kvtier.blend.segments import SegmentStore

__all__ = [
    "BlendError",
    "RopeSpec",
    "SegmentStore",
    "check_ratio",
    "check_segments",
    "rerotate_keys",
    "rerotate_kv",
    "rope_spec",
    "split_on_separator",
]
