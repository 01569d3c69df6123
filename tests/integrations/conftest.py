"""Fixtures for the transformers integration: real SmolLM2 weights (converted once per machine) and
tiny random Llama/Qwen2/Mistral models, plus engines with small chunks so short prompts span several."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.integrations.helpers import make_engine

from kvtier import CacheEngine
from kvtier.models import LoadedModel, load_model

pytest.importorskip("transformers")

RANDOM_SPECS = ("random:llama-tiny", "random:qwen2-tiny", "random:mistral-tiny")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct, real weights; the first use on a machine converts the GGUF (~40 s)."""
    return load_model("smollm2")


@pytest.fixture(scope="session", params=RANDOM_SPECS)
def random_model(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(request.param)


@pytest.fixture
def engine() -> Iterator[CacheEngine]:
    eng = make_engine()
    yield eng
    eng.close()
