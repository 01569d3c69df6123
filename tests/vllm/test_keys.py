"""The vLLM connector's per-request key inputs (pure Python: runs without vLLM).

``request_extras`` reads a vLLM ``Request`` by attribute name; these stand-ins carry the same
attributes. The same rules run against real vLLM requests in ``test_keys_e2e.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

from kvtier.integrations.vllm_keys import Uncacheable, adapter_identity, mm_ids_are_hashes, request_extras
from kvtier.integrations.vllm_plan import Planner
from kvtier.keys import NO_EXTRAS, KeyExtras, MMSpan


def req(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "prompt_embeds": None,
        "mm_features": [],
        "lora_request": None,
        "cache_salt": None,
    }
    base.update(kw)
    return NS(**base)


def mm(identifier: str, offset: int, length: int) -> Any:
    return NS(identifier=identifier, mm_position=NS(offset=offset, length=length))


def test_plain_request_has_no_extras() -> None:
    assert request_extras(req()) == NO_EXTRAS


def test_salt_and_images_are_read() -> None:
    got = request_extras(req(cache_salt="t1", mm_features=[mm("h1", 5, 10), mm("h2", 40, 3)]))
    assert got == KeyExtras(salt="t1", mm=(MMSpan("h1", 5, 10), MMSpan("h2", 40, 3)))


def test_adapter_identity_covers_name_path_and_file_contents(tmp_path: Path) -> None:
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    w = d / "adapter_model.safetensors"
    w.write_bytes(b"weights-1")
    a = request_extras(req(lora_request=NS(lora_name="a", lora_int_id=1, lora_path=str(d))))
    assert isinstance(a, KeyExtras) and a.adapter
    same = request_extras(req(lora_request=NS(lora_name="a", lora_int_id=7, lora_path=str(d))))
    assert same == a  # the int id is a per-process handle, not part of the identity
    renamed = adapter_identity(NS(lora_name="b", lora_path=str(d)))
    assert renamed != a.adapter
    w.write_bytes(b"weights-2")  # retrained in place: same name and path, other weights
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert adapter_identity(NS(lora_name="a", lora_path=str(d))) != a.adapter
    hub = adapter_identity(NS(lora_name="a", lora_path="org/some-adapter"))  # not local: name + path
    assert hub != a.adapter and "org/some-adapter" in hub


def test_inputs_kvtier_cannot_key_make_the_request_uncacheable() -> None:
    assert isinstance(request_extras(req(prompt_embeds=object())), Uncacheable)
    assert isinstance(request_extras(req(mm_features=[mm("", 0, 4)])), Uncacheable)
    assert isinstance(request_extras(req(mm_features=[NS(identifier="h", mm_position=None)])), Uncacheable)
    counter = [mm("renderer0-mm-12-image-0", 0, 4)]
    assert isinstance(request_extras(req(mm_features=counter)), Uncacheable)
    assert isinstance(request_extras(req(mm_features=[mm("h", 0, 4)]), mm_hashed=False), Uncacheable)
    assert request_extras(req(), mm_hashed=False) == NO_EXTRAS  # no items: nothing to doubt


def test_mm_ids_are_hashes_follows_vllm_config() -> None:
    def cfg(mc: Any, prefix: bool) -> Any:
        return NS(model_config=NS(multimodal_config=mc), cache_config=NS(enable_prefix_caching=prefix))

    assert mm_ids_are_hashes(cfg(None, False))  # a text model
    assert mm_ids_are_hashes(cfg(NS(mm_processor_cache_gb=4), False))
    assert mm_ids_are_hashes(cfg(NS(mm_processor_cache_gb=0), True))
    assert not mm_ids_are_hashes(cfg(NS(mm_processor_cache_gb=0), False))


def planner(hit: int = 64) -> tuple[Planner, list[KeyExtras]]:
    seen: list[KeyExtras] = []

    def lookup(tokens: object, extras: KeyExtras) -> int:
        seen.append(extras)
        return hit

    return Planner(lookup, block_size=16, chunk_tokens=32), seen


def test_extras_travel_from_lookup_into_every_spec() -> None:
    p, seen = planner()
    toks = list(range(100))
    x = KeyExtras(adapter="a", salt="s")
    assert p.match("r", toks, 0, x) == 64
    assert seen == [x]
    p.after_alloc("r", toks, 64, x)
    p.new_request("r", None, list(range(7)), 64, 36)
    loads, saves = p.take_specs(["r"])
    assert loads and saves and all(s.extras == x for s in loads + saves)


def test_uncacheable_request_is_neither_looked_up_loaded_nor_saved() -> None:
    p, seen = planner()
    toks = list(range(100))
    assert p.match("r", toks, 0, None) == 0
    assert seen == []
    p.after_alloc("r", toks, 0, None)
    p.new_request("r", None, list(range(7)), 0, 100)
    assert p.take_specs(["r"]) == ([], [])
    assert p.match("r", toks, 0, KeyExtras()) == 0  # a resumed request keeps what it was


def test_request_never_matched_nor_allocated_is_not_saved() -> None:
    """Its key inputs were never read: saving it under the bare tokens could file adapter KV as base KV."""
    p, _ = planner()
    p.new_request("x", list(range(100)), list(range(7)), 0, 100)
    assert p.take_specs(["x"]) == ([], [])


def test_unreadable_adapter_files_make_the_request_uncacheable(tmp_path: Path, monkeypatch: Any) -> None:
    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"w")
    real_open = Path.open

    def deny(self: Path, *a: Any, **kw: Any) -> Any:
        if self.name == "adapter_model.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *a, **kw)

    monkeypatch.setattr(Path, "open", deny)  # what a file root-owned 0600 gives a service user
    got = request_extras(req(lora_request=NS(lora_name="a", lora_path=str(d))))
    assert isinstance(got, Uncacheable) and "cannot be read" in got.reason
