from __future__ import annotations

import random

import pytest
import torch

from kvtier.memory import ALIGN_BYTES, HostBufferPool


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_allocate_views_share_the_arena_and_do_not_overlap() -> None:
    pool = HostBufferPool(1 << 16)
    a = pool.allocate((10, 10), torch.float32)
    b = pool.allocate((3,), torch.float16)
    assert a is not None and b is not None
    a.tensor.fill_(1.0)
    b.tensor.fill_(2.0)
    assert torch.all(a.tensor == 1.0) and torch.all(b.tensor == 2.0)
    assert a.offset % ALIGN_BYTES == 0 and b.offset % ALIGN_BYTES == 0
    assert b.offset >= a.offset + 400
    pool.check_invariants()


def test_allocation_failure_returns_none_and_free_coalesces() -> None:
    pool = HostBufferPool(4 * 1024)
    objs = [pool.allocate((256,), torch.float32) for _ in range(4)]
    assert all(o is not None for o in objs)
    assert pool.allocate((1,), torch.uint8) is None
    for o in (objs[1], objs[2]):
        assert o is not None
        pool.release(o)
    assert pool.largest_free_extent() == 2048  # the two neighbours merged
    big = pool.allocate((512,), torch.float32)
    assert big is not None and big.offset == 1024
    pool.check_invariants()


def test_random_alloc_free_keeps_invariants() -> None:
    rng = random.Random(7)
    pool = HostBufferPool(1 << 20)
    live = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            pool.release(live.pop(rng.randrange(len(live))))
        else:
            o = pool.allocate((rng.randint(1, 20000),), torch.uint8)
            if o is not None:
                live.append(o)
        pool.check_invariants()
    for o in live:
        pool.release(o)
    assert pool.used_bytes == 0 and pool.largest_free_extent() == pool.capacity_bytes


def test_pinned_object_is_freed_only_after_unpin_or_timeout() -> None:
    clock = FakeClock()
    pool = HostBufferPool(4096, pin_timeout_s=10.0, clock=clock)
    o = pool.allocate((1024,), torch.uint8)
    assert o is not None
    o.pin()
    pool.release(o)
    assert pool.used_bytes == 1024  # a reader still holds it
    o.unpin()
    assert pool.used_bytes == 0
    o2 = pool.allocate((1024,), torch.uint8)
    assert o2 is not None
    o2.pin()
    pool.release(o2)
    clock.t = 11.0  # the reader never came back: its pin lapses
    pool.reap([o2])
    assert pool.used_bytes == 0 and not o2.pinned


def test_bad_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        HostBufferPool(0)
