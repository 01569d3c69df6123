#!/usr/bin/env bash
# Session 8's fifth GPU call (lead): #14, does a warmed flex kernel (Llama-3-8B attention shape, bf16) serve
# small selections (< 128 queries, short prompts) without a recompile or a NoValidChoicesError; #21, where the
# worker load's 4.5-5.9 ms host lead goes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 - > "$OUT/flex_small.txt" 2>&1 <<'PY'
import torch, torch._dynamo
from kvtier.blend import flex
sig = flex.Signature("cuda:0", torch.bfloat16, 32, 8, 128, 128 ** -0.5, True)
print("warm", flex.warm_up(sig, 300), flex.disabled())
k = flex.kernel(torch.device("cuda"))
torch._dynamo.config.error_on_recompile = True
g = torch.Generator(device="cuda").manual_seed(0)
for n, seq in [(84, 520), (5, 200), (127, 129), (128, 4000), (2514, 16440), (1, 64)]:
    try:
        with torch.inference_mode():
            q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            buf = torch.randn(3, 1, 8, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            rows = torch.randperm(seq - 1, device="cuda", generator=g)[: n - 1].sort().values
            rows = torch.cat([rows, torch.tensor([seq - 1], device="cuda")])
            out = flex.SelectedRows(rows, seq, k).attend(q, buf[1], buf[2], 128 ** -0.5)
            m = torch.arange(seq, device="cuda")[None] <= rows[:, None]
            ref = torch.nn.functional.scaled_dot_product_attention(q, buf[1].repeat_interleave(4, 1), buf[2].repeat_interleave(4, 1), attn_mask=m, scale=128 ** -0.5).transpose(1, 2)
            print(n, seq, "ok max_abs", float((out.float() - ref.float()).abs().max()))
    except Exception as e:
        print(n, seq, "FAIL", type(e).__name__, str(e)[:200])
PY
cat "$OUT/flex_small.txt" | grep -v Warning | tail -12
timeout 150 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
grep -E "^---|begin_|gap |lead|dma" "$OUT/worker_gaps.txt" | cut -c1-250 | head -60
