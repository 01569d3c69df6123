"""Per-request key inputs (``KeyExtras``): LoRA adapter, cache salt, opaque inputs, multimodal spans."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.engine import CacheEngine
from kvtier.keys import NO_EXTRAS, KeyExtras, MMSpan, Namespace, chunk_keys

NS = Namespace("m", "float16", (4, 2, 16))
TOKENS = list(range(3, 67))  # 4 chunks of 16


def digests(extras: KeyExtras | None) -> list[bytes]:
    return [k.digest for k in chunk_keys(TOKENS, NS, 16, extras=extras)]


def test_empty_extras_give_the_bare_namespace_keys() -> None:
    assert digests(NO_EXTRAS) == digests(None) == digests(KeyExtras())


@pytest.mark.parametrize("field", ["adapter", "salt", "inputs"])
def test_adapter_salt_and_inputs_change_every_key(field: str) -> None:
    a = digests(KeyExtras(**{field: "x"}))
    b = digests(KeyExtras(**{field: "y"}))
    base = digests(None)
    assert all(len({p, q, r}) == 3 for p, q, r in zip(a, b, base, strict=True))


def test_fields_do_not_run_into_each_other() -> None:
    assert digests(KeyExtras(adapter="ab", salt="c")) != digests(KeyExtras(adapter="a", salt="bc"))
    assert digests(KeyExtras(adapter="x")) != digests(KeyExtras(salt="x"))


def test_an_image_changes_the_chunks_from_its_first_on_only() -> None:
    img_a = KeyExtras(mm=(MMSpan("sha-a", 20, 8),))  # inside chunk 1 ([16, 32))
    img_b = KeyExtras(mm=(MMSpan("sha-b", 20, 8),))
    base, a, b = digests(None), digests(img_a), digests(img_b)
    assert a[0] == base[0] == b[0]  # the text before the image: shared
    assert all(len({p, q, r}) == 3 for p, q, r in zip(base[1:], a[1:], b[1:], strict=True))
    moved = digests(KeyExtras(mm=(MMSpan("sha-a", 21, 8),)))  # same image, one token later
    assert moved[0] == a[0] and moved[1] != a[1]
    spanning = digests(KeyExtras(mm=(MMSpan("sha-a", 10, 40),)))  # chunks 0..3 all overlap it
    assert spanning[0] != base[0]


def test_partial_tail_is_keyed_with_its_image() -> None:
    toks = TOKENS[:40]
    base = chunk_keys(toks, NS, 16)
    img = chunk_keys(toks, NS, 16, extras=KeyExtras(mm=(MMSpan("sha", 35, 3),)))
    assert [k.digest for k in base[:2]] == [k.digest for k in img[:2]] and base[2].digest != img[2].digest


def _reference(tokens: list[int], extras: KeyExtras, chunk: int = 16) -> list[bytes]:
    """The keys as ``keys``' docstring states them, written the plain way: a root with the extras'
    digest; a chunk with items keyed under ``MM_SEED`` from the previous key, where the running
    hash restarts; every other chunk the hash of its anchor and the tokens since."""
    import hashlib

    import xxhash

    from kvtier.keys import MM_SEED

    root = hashlib.blake2b(
        b"kvtier-chain-v3" + NS.digest() + chunk.to_bytes(8, "little") + extras.digest(), digest_size=16
    ).digest()
    raw = b"".join(t.to_bytes(4, "little") for t in tokens)
    anchor, since, out = root, 0, []
    for s in range(0, len(tokens), chunk):
        e = min(s + chunk, len(tokens))
        mm = extras.mm_bytes(s, e)
        if mm:
            anchor, since = xxhash.xxh3_128_digest(anchor + raw[s * 4 : e * 4] + mm, MM_SEED), e
            out.append(anchor)
        else:
            out.append(xxhash.xxh3_128_digest(anchor + raw[since * 4 : e * 4]))
    return out


@pytest.mark.parametrize(
    "extras",
    [
        KeyExtras(adapter="lora-a"),
        KeyExtras(salt="t", mm=(MMSpan("img", 20, 8),)),
        KeyExtras(mm=(MMSpan("a", 0, 3), MMSpan("b", 40, 30))),
        KeyExtras(mm=(MMSpan("tail", 60, 2),)),
    ],
)
def test_keys_with_extras_equal_the_stated_reference(extras: KeyExtras) -> None:
    toks = [*TOKENS, 9, 9, 9]  # a partial tail chunk too
    assert digests_of(toks, extras) == _reference(toks, extras)


def digests_of(tokens: list[int], extras: KeyExtras | None) -> list[bytes]:
    return [k.digest for k in chunk_keys(tokens, NS, 16, extras=extras)]


def test_tokens_that_spell_an_items_bytes_do_not_take_its_key() -> None:
    """Were an item's bytes simply fed to the running hash after its chunk, the prompt whose next
    4 tokens are those 16 bytes would hash the same stream, and its partial tail chunk would get
    the image chunk's key. ``MM_SEED`` keeps item chunks in their own domain."""
    img = KeyExtras(mm=(MMSpan("sha-a", 20, 8),))
    with_img = digests_of(TOKENS[:32], img)
    spelled = [int.from_bytes(img.mm_bytes(16, 32)[i : i + 4], "little") for i in range(0, 16, 4)]
    forged = digests_of(TOKENS[:32] + spelled, None)
    assert len(forged) == 3 and with_img[1] not in forged
    assert with_img[0] == forged[0]  # the text before the image is shared, as it must be


@pytest.fixture
def eng(engine: CacheEngine) -> CacheEngine:
    return engine


def kv_for(engine: CacheEngine, n: int) -> torch.Tensor:
    ns = engine.namespace
    assert ns is not None
    layers, heads, dim = ns.kv_shape
    return torch.randn(layers, 2, n, heads, dim)


def test_kv_stored_under_one_adapter_is_a_miss_for_others(eng: CacheEngine) -> None:
    a, b = KeyExtras(adapter="lora-a"), KeyExtras(adapter="lora-b")
    kv = kv_for(eng, len(TOKENS))
    assert eng.store(TOKENS, kv, extras=a) == len(TOKENS)
    assert eng.lookup(TOKENS, extras=a) == len(TOKENS)
    assert eng.lookup(TOKENS) == 0 and eng.lookup(TOKENS, extras=b) == 0
    assert eng.retrieve(TOKENS).num_tokens == 0 and eng.retrieve(TOKENS, extras=b).num_tokens == 0
    got = eng.retrieve(TOKENS, extras=a)
    assert got.kv is not None and torch.equal(got.kv, kv)
    assert eng.first_uncached(TOKENS, extras=b) == 0 and eng.first_uncached(TOKENS, extras=a) == len(TOKENS)


def test_a_key_collision_across_extras_is_a_miss_not_wrong_kv(eng: CacheEngine) -> None:
    """The fingerprint (blake2b) carries the extras too: a chunk filed under another request's
    key (an xxh3 collision, a mis-filed value) fails validation."""
    a, b = KeyExtras(salt="tenant-a"), KeyExtras(salt="tenant-b")
    eng.store(TOKENS[:16], kv_for(eng, 16), extras=a)
    (ka,) = eng.keys(TOKENS[:16], a)
    (kb,) = eng.keys(TOKENS[:16], b)
    chunk = eng.storage.get(ka.digest)
    assert chunk is not None
    eng.storage.put(kb.digest, Chunk(chunk.kv.clone(), chunk.fingerprint, chunk.num_tokens))
    chunk.release()
    before = eng.stats().fingerprint_mismatches
    assert eng.retrieve(TOKENS[:16], extras=b).num_tokens == 0
    assert eng.stats().fingerprint_mismatches == before + 1


def test_extras_are_frozen_values() -> None:
    x = KeyExtras(adapter="a", mm=(MMSpan("h", 0, 1),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.adapter = "b"  # type: ignore[misc]
    assert x == KeyExtras(adapter="a", mm=(MMSpan("h", 0, 1),)) and hash(x) == hash(
        KeyExtras(adapter="a", mm=(MMSpan("h", 0, 1),))
    )
