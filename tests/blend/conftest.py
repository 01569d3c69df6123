"""Fixtures for the blend tests: real SmolLM2 weights (converted once per machine)."""

from __future__ import annotations

import pytest

from kvtier.models import LoadedModel, load_model

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2")
