"""Storage tiers behind one small ABC (see ``base.Tier``)."""

from kvtier.tiers.base import Chunk, Tier, TierError, TierStats

__all__ = ["Chunk", "Tier", "TierError", "TierStats"]
