"""Encoders for the workload tests: SmolLM2's real tokenizer (the benchmark's target) and a word hash."""

from __future__ import annotations

import pytest

from kvtier.bench.workloads import Encode


@pytest.fixture(scope="session")
def smollm2_encode() -> Encode:
    from transformers import AutoTokenizer

    from kvtier.demo.workloads import make_encoder
    from kvtier.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))  # converts the GGUF once per machine
    return make_encoder(tok, len(tok))


@pytest.fixture(scope="session")
def hash_encode() -> Encode:
    from kvtier.demo.workloads import make_encoder

    return make_encoder(None, 49152)


@pytest.fixture(params=["smollm2", "word-hash"])
def encode(request: pytest.FixtureRequest) -> Encode:
    name = "smollm2_encode" if request.param == "smollm2" else "hash_encode"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]
