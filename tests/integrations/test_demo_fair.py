"""Issue 22 #12: the demo's speedup must survive load that changes during the run, and it prints
load-independent facts (tokens not recomputed, prefill FLOPs saved) beside the times."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier.cli import main
from kvtier.demo import main as demo_main
from kvtier.demo.flops import prefill_cost

REQUESTS = 8  # chat: 2 users x 4 rounds
LOAD_S = 0.25  # what a loaded machine adds to each prefill: far above a tiny model's own time


def test_speedup_is_paired_and_survives_load_that_starts_mid_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine gets busy after the first REQUESTS timed prefills. Run sequentially (all
    without kvtier, then all with it) that is exactly when the with-kvtier pass starts, and the
    demo printed a slowdown; interleaved, both variants see the same load request by request."""
    real_load = demo_main.load_model
    prefills = [0]

    def loaded_model(*a: Any, **k: Any) -> Any:
        lm = real_load(*a, **k)

        def busy_machine(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[-1] > 1:  # a prefill (decode steps feed one token)
                prefills[0] += 1
                if prefills[0] > 1 + REQUESTS:  # after the warm-up and REQUESTS timed prefills
                    time.sleep(LOAD_S)

        lm.model.register_forward_pre_hook(busy_machine, with_kwargs=True)
        return lm

    monkeypatch.setattr(demo_main, "load_model", loaded_model)
    rc = main(
        [
            "demo",
            "--model",
            "random:tiny",
            "--out",
            str(tmp_path),
            "--workloads",
            "chat",
            "--users",
            "2",
            "--rounds",
            "4",
            "--system-tokens",
            "80",
            "--turn-tokens",
            "20",
            "--gen-tokens",
            "3",
            "--chunk-tokens",
            "16",
            "--no-disk",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert prefills[0] == 1 + 2 * REQUESTS
    paired = float(re.search(r"speedup (\d+\.\d+)x \(paired", out).group(1))  # type: ignore[union-attr]
    mean_ratio = float(re.search(r"ratio\s+(\d+\.\d+)x", out).group(1))  # type: ignore[union-attr]
    # sequential: every with-kvtier prefill pays LOAD_S and no plain one does: ~0.05x
    assert paired >= 0.5 and mean_ratio >= 0.5, out
    assert "greedy outputs identical with and without kvtier: yes" in out
    m = re.search(r"([\d,]+) of ([\d,]+) prompt tokens not recomputed", out)
    assert m is not None and 0 < int(m.group(1).replace(",", "")) < int(m.group(2).replace(",", ""))
    assert "prefill FLOPs saved" in out


def test_prefill_cost_matches_torchs_flop_counter() -> None:
    """``PrefillCost.flops`` against torch's own count of one eager prefill: they differ only by
    what the model leaves out on purpose (the LM head on the last position) and what eager
    attention computes and masks (the upper triangle of each n x n score matrix)."""
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    cost = prefill_cost(model)
    for n in (16, 100):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=torch.randint(0, 1000, (1, n)), logits_to_keep=1)
        masked = 4 * cost.attn_width * (n * n - n * (n + 1) // 2)
        lm_head = 2 * cfg.hidden_size * cfg.vocab_size
        assert counter.get_total_flops() == cost.flops(0, n) + masked + lm_head
    assert cost.saved(64) + cost.flops(64, 100) == cost.flops(0, 100)  # a hit saves exactly its part
