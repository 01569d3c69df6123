"""Adapters between serving engines and kvtier's CacheEngine (layout translation only).

* ``kvtier.integrations.transformers``: ``prefill``/``generate`` for Hugging Face causal LMs.

Each adapter imports its engine lazily (importing this package needs no engine installed).
"""
