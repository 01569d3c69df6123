"""Quality gate of the lossy KV codecs on SmolLM2-135M real weights and real text (small here;
the full measurement is benchmarks/bench_kv_codec.py, figures in benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from kvtier.bench.kv_quality import _kv_of, held_out_text, measure, roundtrip, score_window, window_ids
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.models import LoadedModel, output_cache


@pytest.fixture(scope="module")
def ids(smollm2: LoadedModel) -> torch.Tensor:
    assert smollm2.tokenizer is not None
    return torch.tensor(smollm2.tokenizer(held_out_text()[:20000])["input_ids"])


def test_engine_path_equals_the_measured_roundtrip(smollm2: LoadedModel, ids: torch.Tensor) -> None:
    """What the gate measures is what the engine serves: KV read back from an int8 engine is the
    bench's roundtrip bit for bit (chunking included), and differs from the raw KV."""
    with torch.inference_mode():
        kv = _kv_of(output_cache(smollm2.model(ids[None, :300], use_cache=True)))
    cfg = Config.load(env={}, chunk__kv_codec="int8", cpu__pin_memory="no")
    with CacheEngine(cfg) as eng:
        assert eng.store(ids[:300], kv) == 300
        got = eng.retrieve(ids[:300])
    assert got.num_tokens == 300 and got.kv is not None
    assert torch.equal(got.kv, roundtrip(kv, "int8", cfg.chunk.chunk_tokens))
    assert not torch.equal(got.kv, kv)


def test_quality_gate_small(smollm2: LoadedModel, ids: torch.Tensor) -> None:
    res = measure(smollm2.model, ids, ["int8", "int4", "int2"], windows=1, prefix=256, cont=64)
    raw, int8, int4, int2 = (res[c] for c in ("none", "int8", "int4", "int2"))
    assert raw.agreement == 1.0 and raw.first_kl == 0.0
    assert abs(int8.ppl / raw.ppl - 1) < 0.01 and int8.agreement >= 0.95
    assert abs(int4.ppl / raw.ppl - 1) < 0.05 and int4.agreement >= 0.85
    # the measurement discriminates: 2-bit KV is measurably worse than 8-bit
    assert int2.first_kl > int8.first_kl and int2.nll_sum > int8.nll_sum


def test_batched_scores_equal_one_forward_per_codec(smollm2: LoadedModel, ids: torch.Tensor) -> None:
    """The gate scores all codecs' continuations in one batched forward; on 2 windows that gives
    the scores of one forward per codec (fp32 rounding at most), and the codecs differ."""
    for i in range(2):
        seq = window_ids(ids, i, prefix=128, cont=32)
        b = score_window(smollm2.model, seq, ["int8", "int4"], prefix=128, chunk_tokens=64)
        u = score_window(smollm2.model, seq, ["int8", "int4"], prefix=128, chunk_tokens=64, batched=False)
        assert list(b) == ["none", "int8", "int4"] == list(u)
        for c in b:
            assert b[c].nll_sum == pytest.approx(u[c].nll_sum, rel=1e-5)
            assert b[c].first_kl == pytest.approx(
                u[c].first_kl, rel=1e-2, abs=1e-6
            )  # KL of ~1e-4: a small difference of logs
            assert abs(b[c].agree - u[c].agree) <= 1 and b[c].n_tokens == u[c].n_tokens == 31
        assert b["int4"].nll_sum != b["none"].nll_sum
