"""Shared fixtures: small KV geometries, KV factories, and the ``gpu`` marker's skip."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.config import CostConfig

LAYERS, HEADS, DIM = 4, 2, 16


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _load_or_recompute_off_unless_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run with ``cost.enabled`` defaulting to off (an explicit setting still wins).

    Load-or-recompute weighs *measured* times: on a loaded machine a tiny test model's prefill
    can beat a RAM tier's read, and the engine then rightly recomputes, so a test expecting an
    exact hit would depend on the weather. Tests of that decision itself are marked
    ``@pytest.mark.cost`` and run with the product's default (on)."""
    if request.node.get_closest_marker("cost") is not None:
        return
    defaults = CostConfig.__init__.__defaults__
    assert defaults is not None and defaults[0] is True, "CostConfig's first field is enabled=True"
    monkeypatch.setattr(CostConfig.__init__, "__defaults__", (False, *defaults[1:]))


def make_kv(
    num_tokens: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layers: int = LAYERS,
    heads: int = HEADS,
    dim: int = DIM,
) -> torch.Tensor:
    """Random KV ``[layers, 2, num_tokens, heads, dim]``; same seed => same tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, num_tokens, heads, dim, generator=g).to(dtype)


def make_tokens(n: int, *, seed: int = 0, vocab: int = 32000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


@pytest.fixture
def engine() -> CacheEngine:
    """An engine with a 64 MiB CPU tier and 16-token chunks, bound to the test geometry."""
    cfg = Config.load(
        env={}, chunk_tokens=16, cpu__max_bytes="64MiB", cpu__pin_memory="no", model__model_id="test-model"
    )
    eng = CacheEngine(cfg)
    eng.bind_model(LAYERS, HEADS, DIM, torch.float32)
    yield eng
    eng.close()
