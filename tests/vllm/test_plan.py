"""Scheduler-side rules of the vLLM connector (pure Python: runs without vLLM)."""

from __future__ import annotations

import pytest

from kvtier.integrations.vllm_plan import Planner


def planner(hit: int, bs: int = 16, chunk: int = 32) -> tuple[Planner, list[int]]:
    calls: list[int] = []

    def lookup(tokens: object, extras: object) -> int:
        calls.append(len(tokens))  # type: ignore[arg-type]
        return hit

    return Planner(lookup, block_size=bs, chunk_tokens=chunk), calls


def test_match_leaves_one_token_to_compute_and_aligns_to_blocks() -> None:
    p, _ = planner(hit=96)
    assert p.match("r", list(range(96)), 0) == 80  # (96 - 1) rounded down to 16
    p, _ = planner(hit=64)
    assert p.match("r", list(range(100)), 0) == 64
    p, _ = planner(hit=70)  # a partial tail hit is cut to the block
    assert p.match("r", list(range(100)), 0) == 64


def test_match_counts_only_tokens_beyond_vllm_hit() -> None:
    p, _ = planner(hit=64)
    assert p.match("r", list(range(100)), 32) == 32
    assert p.match("r", list(range(100)), 64) == 0
    p, calls = planner(hit=64)
    assert p.match("r", list(range(17)), 16) == 0  # nothing left to load: kvtier not even asked
    assert calls == []


def test_load_and_save_specs_through_chunked_prefill_and_decode() -> None:
    p, _ = planner(hit=64)
    toks = list(range(100))
    assert p.match("r", toks, 16) == 48
    p.after_alloc("r", toks, 48)
    blocks = [10, 11, 12, 13, 14, 15, 16]
    p.new_request("r", None, blocks, 64, 20)  # computes [64, 84)
    loads, saves = p.take_specs(["r"])
    assert [(s.start, s.end, s.block_ids) for s in loads] == [(16, 64, [11, 12, 13])]
    assert loads[0].tokens == toks[:64]
    assert [(s.start, s.end, s.block_ids) for s in saves] == [(0, 64, [10, 11, 12, 13])]
    p.running_request("r", None, False, 84, 16)  # -> 100: chunk 64..96 complete
    loads, saves = p.take_specs(["r"])
    assert loads == [] and [(s.start, s.end, s.block_ids) for s in saves] == [(64, 96, [14, 15])]
    toks.extend([7, 8, 9, 10])  # decode: the list is vLLM's live one
    p.running_request("r", [17], False, 100, 1)
    assert p.take_specs(["r"]) == ([], [])  # 101 < 128: no new full chunk


def test_resumed_request_replaces_blocks() -> None:
    p, _ = planner(hit=0)
    toks = list(range(40))
    p.match("r", toks, 0)
    p.after_alloc("r", toks, 0)
    p.new_request("r", None, [1, 2], 0, 20)
    assert p.take_specs(["r"]) == ([], [])
    p.running_request("r", [5, 6, 7], True, 0, 40)  # preempted and rescheduled from scratch
    _, saves = p.take_specs(["r"])
    assert [(s.start, s.end, s.block_ids) for s in saves] == [(0, 32, [5, 6])]


def test_accepting_more_than_planned_is_an_error() -> None:
    p, _ = planner(hit=32)
    p.match("r", list(range(50)), 0)
    with pytest.raises(RuntimeError, match="planned"):
        p.after_alloc("r", list(range(50)), 48)


def test_finished_forgets_request() -> None:
    p, _ = planner(hit=0)
    p.after_alloc("r", [1, 2, 3], 0)
    assert len(p) == 1
    p.finished("r")
    assert len(p) == 0
