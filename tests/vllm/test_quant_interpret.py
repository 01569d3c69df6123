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
