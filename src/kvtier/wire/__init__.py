"""The daemon's wire: the versioned msgspec protocol, the client, and the shared-memory segment.

Used by both ends — ``kvtier.server`` (the daemon) and ``kvtier.tiers.remote`` (the daemon as a
tier) — so it sits below both and imports neither.
"""
