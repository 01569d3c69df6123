"""Connector config parsing, the scheduler's key mirror and its engine (pure Python: no vLLM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import ConfigError
from kvtier.integrations.vllm_shared import config_from_extra, mirror_capacity, scheduler_engine
from kvtier.keys import Namespace
from kvtier.tiers.mirror import MirrorTier


def test_extra_config_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "kvtier.yaml"
    f.write_text("chunk:\n  chunk_tokens: 64\ncpu:\n  max_bytes: 1GiB\n")
    cfg = config_from_extra({"kvtier.config_file": str(f), "kvtier.cpu.max_bytes": "256MiB"})
    assert cfg.chunk.chunk_tokens == 64 and cfg.cpu.max_bytes == 256 * 1024**2
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_extra({"chunk_tokens": 64})
    with pytest.raises(ConfigError, match="chunk_tokenz"):
        config_from_extra({"kvtier.chunk.chunk_tokenz": 64})


def test_mirror_is_a_bounded_lru_of_keys() -> None:
    m = MirrorTier(max_keys=2)
    m.add([b"a", b"b"])
    assert m.contains(b"a")  # touches a: b is now the oldest
    m.add([b"c"])
    assert not m.contains(b"b") and m.contains(b"a") and m.contains(b"c")
    assert m.get(b"a") is None and len(m) == 2 and m.stats().evictions == 1
    assert m.remove(b"a") and not m.remove(b"a")


def test_scheduler_engine_finds_reported_prefix_only() -> None:
    ns = Namespace("m", "float32", (2, 2, 8))
    cfg = config_from_extra({"kvtier.chunk.chunk_tokens": 4, "kvtier.cpu.pin_memory": "no"})
    sh = scheduler_engine(cfg, ns)
    assert sh.mirror and mirror_capacity(cfg, ns) >= 1024
    toks = list(range(10, 22))
    keys = sh.engine.keys(toks)
    sh.engine.learn_keys([keys[0].digest, keys[2].digest])  # a hole at chunk 1 ends the hit
    assert sh.engine.lookup(toks) == 4
    sh.engine.learn_keys([keys[1].digest])
    assert sh.engine.lookup(toks) == 12
