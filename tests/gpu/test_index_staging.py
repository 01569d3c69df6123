"""``IndexStaging``: the vLLM worker's reused token-index buffer (no device allocation per step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.transfer.blocks import IndexStaging, token_index

CPU = torch.device("cpu")


def test_puts_of_one_step_get_disjoint_views_and_a_new_step_reuses_the_memory() -> None:
    st = IndexStaging()
    a = st.put(np.arange(10, dtype=np.int64), CPU)
    b = st.put(np.arange(100, 105, dtype=np.int64), CPU)
    assert a.tolist() == list(range(10)) and b.tolist() == list(range(100, 105))
    st.reset()
    c = st.put(np.full(3, 7, dtype=np.int64), CPU)
    assert c.data_ptr() == a.data_ptr()  # the same memory, step after step
    assert a[:3].tolist() == [7, 7, 7] and b.tolist() == list(range(100, 105))


def test_growing_keeps_the_views_handed_out_before() -> None:
    st = IndexStaging()
    a = st.put(np.arange(5, dtype=np.int64), CPU)
    big = st.put(np.arange(1 << 17, dtype=np.int64), CPU)  # past the first buffer
    assert a.tolist() == list(range(5)) and int(big[-1]) == (1 << 17) - 1


def test_token_index_through_the_staging_equals_the_plain_one() -> None:
    st = IndexStaging()
    for start, end in ((4, 40), (16, 48)):
        want = token_index([7, 3, 9], 0, start, end, 16, CPU)
        got = token_index([7, 3, 9], 0, start, end, 16, CPU, st)
        assert torch.equal(got.blocks, want.blocks) and torch.equal(got.offsets, want.offsets)
        assert (got.whole_blocks is None) == (want.whole_blocks is None)
        if want.whole_blocks is not None:
            assert got.whole_blocks is not None and torch.equal(got.whole_blocks, want.whole_blocks)


def test_a_device_without_index_is_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect: ``torch.device("cuda") != tensor.device`` (``cuda:0``) made the staging reallocate
    its buffers on every put (the CUDA test below failed on the H200 with the old code)."""
    from kvtier.transfer import blocks

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert blocks._indexed(torch.device("cuda")) == torch.device("cuda", 0)
    assert blocks._indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert blocks._indexed(CPU) == CPU


@pytest.mark.gpu
def test_cuda_staging_copies_through_pinned_memory_and_reuses_it_after_the_copy() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    st = IndexStaging()
    a = st.put(np.arange(1000, dtype=np.int64), dev)  # a device without index, as the worker gets it
    torch.cuda._sleep(50_000_000)  # the stream is busy: the next step's put must not race the H2D
    st.reset()
    b = st.put(np.arange(1000, 2000, dtype=np.int64), dev)
    assert b.data_ptr() == a.data_ptr()  # both at offset 0 of the staging's own buffer: reused
    assert b.cpu().tolist() == list(range(1000, 2000))
