"""The vLLM scheduler's step clock (``integrations/vllm_cost.py``): it reports only gaps between
steps that continue each other, so idle time never reads as a slow prefill."""

from __future__ import annotations

from kvtier.integrations.vllm_cost import MAX_STEP_S, StepClock


def test_step_gaps_become_prefill_measurements_only_between_continuing_steps() -> None:
    now = [0.0]
    seen: list[tuple[int, float]] = []
    clock = StepClock(lambda n, s: seen.append((n, s)), clock=lambda: now[0])
    clock.step(512, continues_previous=False)  # a new request's prefill
    now[0] = 0.5
    clock.step(1, continues_previous=True)  # its decode: the prefill took 0.5 s
    now[0] = 0.52
    clock.step(0, continues_previous=False)  # it finished; idle
    now[0] = 30.0
    clock.step(256, continues_previous=False)  # a new burst after 30 s idle: no measurement
    now[0] = 30.0 + MAX_STEP_S + 1
    clock.step(1, continues_previous=True)  # a stall longer than any step: not a rate
    assert seen == [(512, 0.5)]
