from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import Config, ConfigError, format_size, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("20GiB", 20 * 2**30),
        ("500MB", 500 * 10**6),
        ("4096", 4096),
        (" 1.5 KiB", 1536),
        (7, 7),
        ("2g", 2 * 10**9),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["20 parsecs", "-1", "GiB", True, -5, "1e3"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad, "cpu.max_bytes")


def test_defaults() -> None:
    cfg = Config.load(env={})
    assert cfg.chunk.chunk_tokens == 256 and cfg.chunk.allow_partial_chunks
    assert cfg.cpu.eviction_policy == "lru" and cfg.server.host == "127.0.0.1"


def test_precedence_file_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "kvtier.yaml"
    f.write_text("cpu:\n  max_bytes: 1GiB\n  eviction_policy: lfu\nchunk:\n  chunk_tokens: 64\n")
    env = {"KVTIER_CPU__MAX_BYTES": "2GiB", "KVTIER_CHUNK_TOKENS": "128", "OTHER": "x"}
    cfg = Config.load(f, env=env, chunk_tokens=32)
    assert cfg.cpu.max_bytes == 2 * 2**30  # env beats file
    assert cfg.cpu.eviction_policy == "lfu"  # file beats default
    assert cfg.chunk.chunk_tokens == 32  # overrides beat env
    assert Config.load(env={"KVTIER_CONFIG": str(f)}).chunk.chunk_tokens == 64


def test_bool_and_section_forms() -> None:
    cfg = Config.load(env={"KVTIER_CHUNK__ALLOW_PARTIAL_CHUNKS": "false"}, cpu={"eviction_policy": "arc"})
    assert cfg.chunk.allow_partial_chunks is False and cfg.cpu.eviction_policy == "arc"
    assert Config.load(env={}, **{"cpu.max_bytes": "1MiB"}).cpu.max_bytes == 2**20


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"chunk_tokens": 0}, "chunk.chunk_tokens"),
        ({"chunk_tokens": "many"}, "integer"),
        ({"cpu__eviction_policy": "random"}, "eviction_policy"),
        ({"cpu__max_bytes": "lots"}, "cpu.max_bytes"),
        ({"no_such_key": 1}, "unknown key"),
        ({"nosection.x": 1}, "unknown section"),
        ({"eviction_policy": "lru"}, "ambiguous"),
        ({"server__port": 70000}, "server.port"),
        ({"model__tp_rank": 2, "model__tp_size": 2}, "tp_rank"),
        ({"disk__enabled": True}, "disk.path"),
        ({"chunk__allow_partial_chunks": "maybe"}, "true/false"),
    ],
)
def test_bad_values_name_the_field(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        Config.load(env={}, **kw)


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("cpu: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(f, env={})
    with pytest.raises(ConfigError, match="missing.yaml"):
        Config.load(tmp_path / "missing.yaml", env={})


def test_format_size() -> None:
    assert format_size(4 * 2**30) == "4GiB" and format_size(1000) == "1000"


def test_env_names_that_are_not_config_are_left_alone() -> None:
    cfg = Config.load(env={"KVTIER_CACHE_DIR": "/tmp/x", "KVTIER_SOAK": "1", "KVTIER_CHUNK_TOKENS": "64"})
    assert cfg.chunk.chunk_tokens == 64
    with pytest.raises(ConfigError, match="unknown key"):
        Config.load(env={"KVTIER_CPU__MAX_BYTEZ": "1GiB"})


def test_config_names_match_their_owners_registries() -> None:
    """Config is a leaf (it may not import the policies, codecs or tiers it names), so it keeps its
    own lists of valid names; this keeps them equal to the registries that own those names."""
    from kvtier import config as C
    from kvtier.policies import POLICIES
    from kvtier.serde import CODECS

    assert set(C.POLICY_NAMES) == set(POLICIES)
    assert {"raw", "zstd", "lz4"} <= set(CODECS)
    import inspect

    from kvtier.tiers import factory

    src = inspect.getsource(factory.build_remote_tier)
    for scheme in C.REMOTE_SCHEMES:  # every scheme config accepts has a tier that takes it
        assert f'"{scheme.partition("+")[0]}"' in src, scheme
