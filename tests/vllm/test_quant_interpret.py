"""The fused save path's Triton quantize kernels (``transfer/kernels/quant_triton.py``) on CPU,
in Triton's interpreter (``TRITON_INTERPRET=1``; the vLLM venv ships triton, the main one not).

The interpreter emulates the reductions' NaN semantics (``tl.max`` -> maxnum drops NaN, as on a
GPU), so the non-finite guard of the kernels is tested here without a GPU; the CUDA tests in
tests/gpu/test_quant_kernels.py check the compiled kernels. Run in a subprocess: the interpreter
is chosen when ``triton.jit`` decorates, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, torch
from kvtier.serde.kvcodec import KV_CODECS
from kvtier.transfer.kernels.quant_kernels import gather_quant
NB, BS, H, D, CT = 4, 16, 1, 64, 64
out = {}
for name in sorted(KV_CODECS):
    codec = KV_CODECS[name]
    off = codec.scales_offset((1, 2, CT, H, D))
    for bad in ("none", "nan", "inf"):
        g = torch.Generator().manual_seed(0)
        caches = [torch.randn(2, NB, BS, H, D, generator=g) * 4 for _ in range(1)]
        caches[0][:, 2] = 0  # an all-zero block: scale-1 groups
        if bad != "none":
            caches[0][1, 1, 3, 0, 5] = float(bad)  # a value: block 1, offset 3
            caches[0][0, 3, 9, 0, 2] = float(bad)  # a key: block 3, offset 9
        slots = torch.randperm(NB * BS, generator=g)[:CT]
        tri = gather_quant(caches, slots, name, CT, backend="triton")
        ref = gather_quant(caches, slots, name, CT, backend="torch")
        words = lambda p: p[0, off:].contiguous().view(torch.float32)
        out[f"{name}-{bad}"] = {
            "equal": bool(torch.equal(tri, ref)),
            "nonfinite": int((~torch.isfinite(words(tri))).sum()),
            "nonfinite_torch": int((~torch.isfinite(words(ref))).sum()),
        }
print(json.dumps(out))
"""


def test_triton_kernels_give_nonfinite_kv_a_nonfinite_scale() -> None:
    """Finite fp32 KV: the kernels' bytes equal the torch codec's (the NaN-propagating reductions
    change nothing). NaN/Inf KV: the groups holding it get non-finite scales, as in the torch
    codec, so ``store_packed_range`` refuses the chunk. Before the fix NaN gave finite scales."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": src}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("fp8", "int2", "int4", "int8"):
        assert res[f"{name}-none"] == {"equal": True, "nonfinite": 0, "nonfinite_torch": 0}
        for bad in ("nan", "inf"):
            r = res[f"{name}-{bad}"]
            assert r["nonfinite"] >= 2 and r["nonfinite"] == r["nonfinite_torch"], (name, bad, r)


LAYERS_SCRIPT = r"""
import json, torch
from kvtier.serde.kvcodec import KV_CODECS
from kvtier.transfer.kernels import quant_triton
from kvtier.transfer.kernels.quant_kernels import gather_quant, scatter_dequant
import sys
NB, BS, H, D, CT, L = 6, 16, 2, 64, 64, 3
quant_triton.KIVI_VALUE_TOKENS = int(sys.argv[1])

class Count:
    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0
    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]

counts = {k: Count(getattr(quant_triton, k)) for k in ("_kivi_kernel", "_per_token_kernel")}
for k, c in counts.items():
    setattr(quant_triton, k, c)
launches = lambda: sum(c.n for c in counts.values())
out = {}
VARIANT = quant_triton.KIVI_VALUE_TOKENS != 64  # only the KIVI value programs change
for dtype in (torch.float32,) if VARIANT else (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    # separate allocations, as vLLM's layers are: the kernels find them through the layer table
    caches = [(torch.randn(2, NB, BS, H, D, generator=g) * 4).to(dtype) for _ in range(L)]
    caches[1][:, 2] = 0  # an all-zero block: scale-1 groups
    slots = torch.randperm(NB * BS, generator=g)[: 1 * CT]
    # HND handed out as a strided view (other strides than the NHD layers)
    hnd = (torch.randn(2, NB, H, BS, D, generator=g) * 4).to(dtype).permute(0, 1, 3, 2, 4)
    for name in ("int2", "int4") if VARIANT else sorted(KV_CODECS):
        r = {}
        n0 = launches()
        tri = gather_quant(caches, slots, name, CT, backend="triton")
        r["gather_launches"] = launches() - n0
        ref = gather_quant(caches, slots, name, CT, backend="torch")
        r["gather_equal"] = bool(torch.equal(tri, ref))
        backs = []
        for backend in ("torch", "triton"):
            back = [torch.zeros_like(c) for c in caches]
            n0 = launches()
            scatter_dequant(ref, back, slots, name, CT, backend=backend)
            if backend == "triton":
                r["scatter_launches"] = launches() - n0
            backs.append(back)
        # the interpreter casts fp32 -> bf16 by truncation (compiled Triton and torch round to
        # nearest even), so bf16 scatters are compared on CUDA only (tests/gpu/test_quant_kernels.py)
        r["scatter_equal"] = dtype == torch.bfloat16 or all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(*backs)
        )
        # one layer at a time into its share of the chunk (the vLLM worker's save_kv_layer)
        part = torch.full_like(ref, 0xAB)
        for i, c in enumerate(caches):
            gather_quant([c], slots, name, CT, out=part, first_layer=i, num_layers=L, backend="triton")
        r["per_layer_equal"] = bool(torch.equal(part, ref))
        out[f"{name}-{str(dtype)[6:]}"] = r
        if dtype != torch.float32:
            continue
        # layers of different strides: one launch each, same bytes
        mixed = [caches[0], hnd, caches[2]]
        n0 = launches()
        tri = gather_quant(mixed, slots, name, CT, backend="triton")
        r["mixed_launches"] = launches() - n0
        r["mixed_equal"] = bool(torch.equal(tri, gather_quant(mixed, slots, name, CT, backend="torch")))
print(json.dumps(out))
"""


@pytest.mark.parametrize("value_tokens", [64, 16])
def test_one_launch_covers_every_layer_bit_exact_with_torch(value_tokens: int) -> None:
    """The kernels reach every layer through a device table of per-layer offsets, so one launch
    moves all layers of a call (int4/int2 before: two launches per layer, 64 for 32 layers: the
    host paced the overlapped store). Bytes equal the torch codec's both ways, for separately
    allocated layers, for one layer at a time, and for layers of different strides (HND view),
    which fall back to one launch per layer. ``value_tokens``: ``KIVI_VALUE_TOKENS`` (the same bytes)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": src}
    run = subprocess.run(
        [sys.executable, "-c", LAYERS_SCRIPT, str(value_tokens)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(res) == (4 * 2 if value_tokens == 64 else 2)
    for key, r in res.items():
        mixed = {"mixed_launches": 3, "mixed_equal": True} if key.endswith("float32") else {}
        assert r == {
            "gather_launches": 1,
            "gather_equal": True,
            "scatter_launches": 1,
            "scatter_equal": True,
            "per_layer_equal": True,
            **mixed,
        }, (key, r)
