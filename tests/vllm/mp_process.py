"""vLLM with its default multiprocess executor (scheduler and worker in different processes):
the scheduler must find the worker's chunks through the keys the worker reports.

``python mp_process.py MODEL_DIR OUT_JSON``: prints nothing, writes the three generations' figures.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from llm_util import greedy, make_llm

    model, out_file = sys.argv[1:3]
    extra = {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB"}
    llm = make_llm(model, engine_id="kvtier-test-mp", extra=extra)
    rng = random.Random(11)
    p = [rng.randrange(3, 500) for _ in range(600)]
    first = greedy(llm, [[*p, 5]])[0]
    assert llm.reset_prefix_cache()
    hit = greedy(llm, [[*p, 6, 7]])[0]
    ref = greedy(llm, [[*p, 6, 7]], skip_cache=True)[0]
    out = {
        name: {"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}
        for name, o in (("first", first), ("hit", hit), ("ref", ref))
    }
    Path(out_file).write_text(json.dumps(out))


if __name__ == "__main__":  # vLLM spawns its engine process: keep module import side-effect free
    main()
