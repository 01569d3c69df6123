from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.keys import Namespace, chunk_keys, tokens_to_array

NS = Namespace("m", "float16", (4, 2, 16))


def test_chunks_cover_tokens_and_partial_tail() -> None:
    keys = chunk_keys(list(range(40)), NS, 16)
    assert [(k.start, k.end) for k in keys] == [(0, 16), (16, 32), (32, 40)]
    full = chunk_keys(list(range(40)), NS, 16, allow_partial=False)
    assert [(k.start, k.end) for k in full] == [(0, 16), (16, 32)]
    assert [k.digest for k in full] == [k.digest for k in keys[:2]]


def test_keys_are_chained_over_the_whole_prefix() -> None:
    a = chunk_keys(list(range(48)), NS, 16)
    b_tokens = list(range(48))
    b_tokens[3] = 999  # differs only in chunk 0
    b = chunk_keys(b_tokens, NS, 16)
    assert all(x.digest != y.digest for x, y in zip(a, b, strict=True))
    c = chunk_keys(list(range(32)) + [7] * 16, NS, 16)
    assert [k.digest for k in c[:2]] == [k.digest for k in a[:2]] and c[2].digest != a[2].digest


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_id", "other"),
        ("kv_dtype", "bfloat16"),
        ("kv_shape", (4, 2, 32)),
        ("tp_rank", 1),
        ("cache_salt", "tenant-b"),
    ],
)
def test_every_namespace_field_changes_the_key(field: str, value: object) -> None:
    kw = {"model_id": "m", "kv_dtype": "float16", "kv_shape": (4, 2, 16), "tp_rank": 0, "tp_size": 2}
    kw[field] = value
    other = Namespace(**kw)  # type: ignore[arg-type]
    base = Namespace("m", "float16", (4, 2, 16), tp_size=2)
    assert chunk_keys([1, 2, 3], base, 16)[0].digest != chunk_keys([1, 2, 3], other, 16)[0].digest


def test_list_numpy_and_tensor_inputs_hash_alike() -> None:
    toks = [5, 6, 7, 100000, 0] * 10
    d = [k.digest for k in chunk_keys(toks, NS, 16)]
    assert d == [k.digest for k in chunk_keys(np.array(toks, dtype=np.int32), NS, 16)]
    assert d == [k.digest for k in chunk_keys(torch.tensor(toks), NS, 16)]


@pytest.mark.parametrize("bad", [[[1, 2], [3, 4]], [1.5, 2.0], [-1, 3]])
def test_bad_tokens_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="tokens"):
        tokens_to_array(bad)


def test_bad_chunk_size_rejected() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys([1, 2], NS, 0)


_SNIPPET = """
from kvtier.keys import Namespace, chunk_keys
ns = Namespace("llama", "bfloat16", (32, 8, 128), 1, 2, "salt")
print(",".join(k.hex() for k in chunk_keys(list(range(1000)), ns, 256)))
"""


def test_keys_identical_across_processes_with_different_hash_seeds() -> None:
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", _SNIPPET], env=env, capture_output=True, text=True, check=True
        )
        outs.append(out.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0].split(",")) == 4
    ns = Namespace("llama", "bfloat16", (32, 8, 128), 1, 2, "salt")
    assert outs[0] == ",".join(k.hex() for k in chunk_keys(list(range(1000)), ns, 256))


def _root(ns: Namespace, chunk: int, xd: bytes = b"") -> bytes:
    """The running hash's root as the module docstring states it."""
    import hashlib

    return hashlib.blake2b(
        b"kvtier-chain-v3" + ns.digest() + chunk.to_bytes(8, "little") + xd, digest_size=16
    ).digest()


def test_keys_are_one_running_xxh3_128_under_a_versioned_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """k_i = xxh3_128(root || tokens[:e_i]); the format version is in the namespace digest, so keys
    of an older format (v1: blake2b chain, v2: xxh3 chain) can never be found by this one."""
    import xxhash

    from kvtier import keys as K

    ns = Namespace("m", "float32", (2, 2, 8))
    toks = np.arange(600, dtype=np.uint32)
    got = K.chunk_keys(toks, ns, 256)
    raw = toks.astype("<u4").tobytes()
    root = _root(ns, 256)
    want = [xxhash.xxh3_128_digest(root + raw[: e * 4]) for e in (256, 512, 600)]
    assert [k.digest for k in got] == want and [(k.start, k.end) for k in got] == [
        (0, 256),
        (256, 512),
        (512, 600),
    ]
    nsd, prev, v2 = ns.digest(), ns.digest(), []
    for s in range(0, 600, 256):  # the v2 chain, for the record: none of its keys is a v3 key
        prev = xxhash.xxh3_128_digest(prev + raw[s * 4 : min(s + 256, 600) * 4] + nsd)
        v2.append(prev)
    assert not set(v2) & set(want)
    assert K.KEY_FORMAT == "kvtier-ns-v3-xxh3-run"
    monkeypatch.setattr(K, "KEY_FORMAT", "kvtier-ns-v2-xxh3")
    assert ns.digest() != nsd  # another format version: another namespace, all keys differ


def test_the_chunk_size_is_in_every_key() -> None:
    """The same 512-token prefix is key 1 at 256-token chunks and key 0 at 512: the values differ
    (the last 256 vs 512 tokens' KV), so the keys must too."""
    toks = list(range(512))
    k256 = chunk_keys(toks, NS, 256)
    k512 = chunk_keys(toks, NS, 512)
    assert k256[1].end == k512[0].end == 512 and k256[1].digest != k512[0].digest
    k128 = chunk_keys(toks, NS, 128)
    assert len({k128[3].digest, k256[1].digest, k512[0].digest}) == 3


def _reference_keys(
    tokens: list[int], ns: Namespace, chunk: int, allow_partial: bool
) -> list[tuple[bytes, int, int]]:
    """The keys as the module docstring states them, written the plain way (one hash per prefix)."""
    import xxhash

    root = _root(ns, chunk)
    stop = len(tokens) if allow_partial else len(tokens) // chunk * chunk
    body = b"".join(t.to_bytes(4, "little") for t in tokens[:stop])
    out = []
    for s in range(0, stop, chunk):
        e = min(s + chunk, stop)
        out.append((xxhash.xxh3_128_digest(root + body[: e * 4]), s, e))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 16, 256])
@pytest.mark.parametrize("allow_partial", [True, False])
def test_chain_equals_a_plain_reference_on_random_tokens(chunk: int, allow_partial: bool) -> None:
    rng = np.random.default_rng(chunk)
    for n in (0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, 5 * chunk + 2, 1000):
        toks = rng.integers(0, 2**32, size=max(n, 0), dtype=np.uint64).tolist()
        got = [tuple(k) for k in chunk_keys(toks, NS, chunk, allow_partial=allow_partial)]
        assert got == _reference_keys(toks, NS, chunk, allow_partial), (n, chunk)


@pytest.mark.parametrize(
    "dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", ">i8", ">u4", ">i4"]
)
def test_every_integer_dtype_gives_the_same_ids_and_refuses_out_of_range(dtype: str) -> None:
    dt = np.dtype(dtype)
    top = min(int(np.iinfo(dt).max), 2**32 - 1)
    ok = np.array([0, 1, top], dtype=dt)
    assert tokens_to_array(ok).tolist() == [0, 1, top] and tokens_to_array(ok).dtype == np.dtype("<u4")
    assert tokens_to_array(np.array([], dtype=dt)).size == 0
    if dt.kind == "i":
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            tokens_to_array(np.array([5, -1, 7], dtype=dt))
    if dt.itemsize == 8:
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            tokens_to_array(np.array([5, 2**32, 7], dtype=dt))


def test_a_strided_uint32_array_is_copied_not_hashed_as_is() -> None:
    base = np.arange(64, dtype="<u4")
    view = base[::2]
    assert not view.flags.c_contiguous
    assert [k.digest for k in chunk_keys(view, NS, 16)] == [
        k.digest for k in chunk_keys(view.tolist(), NS, 16)
    ]
    same = np.arange(32, dtype="<u4")
    assert tokens_to_array(same) is same  # already the key format: no copy
