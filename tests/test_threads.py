"""Helper threads without an OpenMP team of their own (``kvtier/threads.py``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
import torch

from kvtier import threads
from kvtier.finite import AheadChecker


def _in_thread(fn: Callable[[], object]) -> object:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


needs_omp = pytest.mark.skipif(
    not threads._omp_setters() or torch.get_num_threads() < 2,
    reason="no OpenMP runtime found, or torch runs on one thread anyway",
)


@needs_omp
def test_only_the_calling_thread_goes_down_to_one() -> None:
    before = torch.get_num_threads()

    def helper() -> int:
        threads.one_omp_thread()
        return torch.get_num_threads()

    assert _in_thread(helper) == 1
    assert torch.get_num_threads() == before  # the caller's and torch's default are untouched
    assert _in_thread(torch.get_num_threads) == before  # a fresh thread still gets the default


@needs_omp
def test_a_helper_threads_parallel_op_starts_no_team() -> None:
    big = torch.randn(1 << 22)  # far above ATen's grain size: a parallel sum on a plain thread

    def helper() -> int:
        threads.one_omp_thread()
        n0 = _os_threads()
        for _ in range(3):
            big.sum()
        return _os_threads() - n0

    assert _in_thread(helper) == 0


@needs_omp
def test_the_finite_guards_thread_is_limited() -> None:
    checker = AheadChecker()
    try:
        seen = checker._executor().submit(torch.get_num_threads).result()
    finally:
        checker.close()
    assert seen == 1


@needs_omp
def test_the_runtime_torch_uses_is_found_among_others(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = list(threads._omp_setters())
    monkeypatch.setattr(threads, "_omp_setters", lambda: [calls.append, *real])  # another runtime first
    assert _in_thread(lambda: (threads.one_omp_thread(), torch.get_num_threads())[1]) == 1
    assert calls == [1]


def test_no_runtime_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    threads._omp_setters.cache_clear()
    monkeypatch.setattr(threads, "loaded_libraries", lambda: ["/nowhere/libgomp.so.1"])
    try:
        assert threads._omp_setters() == []
        _in_thread(threads.one_omp_thread)  # nothing to set: still fine
    finally:
        threads._omp_setters.cache_clear()
