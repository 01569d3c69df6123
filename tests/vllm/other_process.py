"""Run one vLLM instance in its own process, store a prompt's KV in kvtier's shared store, exit.

``python other_process.py MODEL_DIR REDIS_URL TOKENS_JSON OUT_JSON``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_util import greedy, make_llm


def main() -> None:
    model, url, tokens_file, out_file = sys.argv[1:5]
    tokens = json.loads(Path(tokens_file).read_text())
    extra = {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB", "kvtier.remote.url": url}
    llm = make_llm(model, engine_id="kvtier-test-other", extra=extra)
    out = greedy(llm, [tokens])[0]
    from kvtier.integrations.vllm import connector_stats, find_engine

    eng = find_engine("kvtier-test-other")
    assert eng is not None
    eng.flush(timeout_s=30)
    Path(out_file).write_text(
        json.dumps({"tokens": list(out.outputs[0].token_ids), "stats": connector_stats("kvtier-test-other")})
    )


if __name__ == "__main__":
    main()
