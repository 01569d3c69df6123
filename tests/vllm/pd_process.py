"""The prefill side of a disaggregated pair, then a colocated reference, in one process.

``python pd_process.py MODEL_DIR DAEMON_URL TOKENS_JSON OUT_JSON``

1. A ``kv_producer`` instance prefills the prompt (``max_tokens=1``, what a PD router sends to
   the prefill instance), storing its KV in the daemon; then, after vLLM's prefix cache is reset,
   prefills it again: a producer never loads, so vLLM computes it all again.
2. A single ``kv_both`` instance with its own CPU tier (the colocated deployment) generates the
   reference answer the decode side must reproduce.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from llm_util import greedy, make_llm


def _gen(out: Any) -> dict[str, Any]:
    c = out.outputs[0]
    return {
        "tokens": list(c.token_ids),
        "logprobs": [next(iter(d.values())).logprob for d in c.logprobs],
        "cached": out.num_cached_tokens,
    }


def main() -> None:
    model, url, tokens_file, out_file = sys.argv[1:5]
    prompt = json.loads(Path(tokens_file).read_text())
    from kvtier.integrations.vllm import connector_stats

    extra = {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB", "kvtier.remote.url": url}
    prod = make_llm(model, engine_id="pd-producer", extra=extra, kv_role="kv_producer")
    first = _gen(greedy(prod, [prompt], max_tokens=1)[0])
    after_first = connector_stats("pd-producer")
    assert prod.reset_prefix_cache()
    again = _gen(greedy(prod, [prompt], max_tokens=1)[0])
    after_again = connector_stats("pd-producer")
    del prod
    gc.collect()

    both = make_llm(
        model,
        engine_id="pd-both",
        extra={"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB"},
    )
    ref = _gen(greedy(both, [prompt], max_tokens=8)[0])
    stats_ref = connector_stats("pd-both")
    Path(out_file).write_text(
        json.dumps(
            {
                "first": first,
                "again": again,
                "stats_first": after_first,
                "stats_again": after_again,
                "ref": ref,
                "stats_ref": stats_ref,
            }
        )
    )


if __name__ == "__main__":
    main()
