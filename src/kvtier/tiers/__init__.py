"""Storage tiers behind one small ABC (see ``base.Tier``)."""

from kvtier.chunk import Chunk
from kvtier.tiers.base import Tier, TierError, TierStats

__all__ = ["Chunk", "Tier", "TierError", "TierStats"]
