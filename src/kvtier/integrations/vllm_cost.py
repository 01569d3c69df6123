"""The vLLM scheduler's measured prefill rate, for ``CacheEngine.lookup_by_cost``.

The scheduler never sees a forward, but it builds one connector metadata per step, right before
the step runs: the time from one ``build_connector_meta`` to the next is the previous step's
duration, and that step computed ``sum(num_scheduled_tokens)`` tokens. A gap is reported only
when the next step continues requests of the previous one (running requests scheduled again),
so idle time between bursts never reads as a slow prefill; and only gaps of steps that
scheduled tokens, capped at ``MAX_STEP_S`` (a stall, not a rate). Mixed prefill/decode steps
are fine: the engine fits ``seconds = fixed + per_token * tokens`` over them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_STEP_S = 60.0


class StepClock:
    """Turns consecutive scheduler steps into ``note(tokens, seconds)`` calls."""

    def __init__(
        self, note: Callable[[int, float], None], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._note = note
        self._clock = clock
        self._last_t: float | None = None
        self._last_tokens = 0

    def step(self, scheduled_tokens: int, continues_previous: bool) -> None:
        """Call once per step, before it runs; ``continues_previous``: it schedules requests that
        the previous step also ran."""
        now = self._clock()
        if self._last_t is not None and continues_previous and self._last_tokens > 0:
            dt = now - self._last_t
            if 0 < dt <= MAX_STEP_S:
                self._note(self._last_tokens, dt)
        self._last_t, self._last_tokens = now, scheduled_tokens
