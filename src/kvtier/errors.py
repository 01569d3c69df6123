"""The root of every error kvtier raises on purpose: ``except KVTierError`` catches them all.

Each module keeps its specific class next to the code that raises it (``KVError`` in the
engine, ``TierError`` in the tiers, ``ConfigError`` in config, ...); each derives from
``KVTierError`` and, for callers written before the root existed, from the builtin it always
was (``ValueError`` for bad input, ``RuntimeError`` for a failed start-up). Runtime failures of a
cache tier are not errors at all: they are misses (see ``storage.py``).
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every exception kvtier raises deliberately."""


class StateError(KVTierError, RuntimeError):
    """An operation was called in a state that does not allow it (closed, already bound, ...)."""
