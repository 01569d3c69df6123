"""CPU (CI) tests of the layer-group load ring (``transfer.grouped``): its address math against
the per-layer path, for partial first/tail chunks, several loads, group sizes and call orders."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from tests.gpu.helpers import bits_equal, random_bits

from kvtier.transfer.blocks import scatter_pieces, token_index
from kvtier.transfer.grouped import GroupedLoad, LoadPieces
from kvtier.transfer.layout import detect_layout

L, NB, BS, H, D, CT = 5, 40, 4, 2, 8, 8
CPU = torch.device("cpu")


def _setup(seed: int) -> tuple[list[torch.Tensor], list[LoadPieces]]:
    g = torch.Generator().manual_seed(seed)
    caches = [random_bits((2, NB, BS, H, D), torch.float32, "cpu", g) for _ in range(L)]

    def chunk(n: int = CT) -> torch.Tensor:
        return random_bits((L, 2, n, H, D), torch.float32, "cpu", g)

    # load A: tokens [4, 28) of a request whose blocks start at token 0: a partial first chunk
    # (rows 4..8), two whole chunks, a 4-token tail chunk; load B: two whole chunks
    blocks_a = [30, 3, 17, 8, 22, 11, 5, 36]
    a = LoadPieces(
        token_index(blocks_a, 0, 4, 28, BS, CPU),
        [(chunk(), 4, 8), (chunk(), 0, 8), (chunk(), 0, 8), (chunk(4), 0, 4)],
    )
    blocks_b = [1, 9, 25, 14]
    b = LoadPieces(token_index(blocks_b, 0, 0, 16, BS, CPU), [(chunk(), 0, 8), (chunk(), 0, 8)])
    return caches, [a, b]


def _expected(caches: list[torch.Tensor], loads: list[LoadPieces]) -> list[torch.Tensor]:
    """What the per-layer path writes: the reference every ring load must equal bit for bit."""
    lay = detect_layout(caches[0], block_size=BS)
    want = [c.clone() for c in caches]
    for i in range(L):
        for ld in loads:
            scatter_pieces(lay, want[i], ld.idx, [kv[i, :, a:b] for kv, a, b in ld.pieces])
    return want


@pytest.mark.parametrize("group_layers", [1, 2, 4])
@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_grouped_load_is_bit_exact_with_the_per_layer_path(group_layers: int, order: str) -> None:
    caches, loads = _setup(seed=group_layers)
    lay = detect_layout(caches[0], block_size=BS)
    want = _expected(caches, loads)
    assert GroupedLoad.plan(lay, loads, L)
    gl = GroupedLoad(lay, loads, L, CPU, group_layers=group_layers)
    assert gl.group_layers == group_layers
    layers = list(range(L))
    if order == "reversed":
        layers.reverse()
    elif order == "shuffled":
        random.Random(group_layers).shuffle(layers)
    for i in layers:
        gl.layer(i, caches[i])
        gl.layer(i, caches[i])  # a second call for a layer is a no-op
    gl.wait()
    for i in range(L):
        assert bits_equal(caches[i], want[i]), f"layer {i} differs"
    if order == "forward":  # in order, every layer comes from the ring (no fallback)
        assert gl.grouped_layers == L


def test_group_size_follows_the_staging_budget() -> None:
    caches, loads = _setup(seed=0)
    lay = detect_layout(caches[0], block_size=BS)
    layer_bytes = sum(int(kv.shape[2]) for ld in loads for kv, _, _ in ld.pieces) * 2 * H * D * 4
    assert GroupedLoad(lay, loads, L, CPU, staging_bytes=2 * 2 * layer_bytes).group_layers == 2
    assert GroupedLoad(lay, loads, L, CPU, staging_bytes=1).group_layers == 1
    assert GroupedLoad(lay, loads, L, CPU, staging_bytes=1 << 40).group_layers == 4


def test_unaligned_or_strided_pieces_are_not_planned() -> None:
    caches, loads = _setup(seed=0)
    lay = detect_layout(caches[0], block_size=BS)
    kv, _, b = loads[0].pieces[0]
    odd = [LoadPieces(loads[0].idx, [(kv, 2, b), *loads[0].pieces[1:]])]
    assert not GroupedLoad.plan(lay, odd, L)
    strided = [
        LoadPieces(
            loads[1].idx, [(p[0].transpose(0, 1).contiguous().transpose(0, 1), 0, 8) for p in loads[1].pieces]
        )
    ]
    assert not GroupedLoad.plan(lay, strided, L)
    assert not GroupedLoad.plan(lay, [LoadPieces(token_index([1, 2], 0, 0, 6, BS, CPU), [(kv, 0, 6)])], L)


@pytest.mark.gpu
@pytest.mark.parametrize("copy_streams", [1, 2])
@pytest.mark.parametrize("group_layers", [1, 2])
def test_grouped_load_on_cuda_is_bit_exact_over_one_or_two_copy_streams(
    copy_streams: int, group_layers: int
) -> None:
    """The same loads on CUDA: pinned host chunks, device caches, indexes through the worker's
    ``IndexStaging``, the group's DMAs split over ``copy_streams`` streams; the stream is held
    back by a sleep kernel so a missing wait between a DMA and its scatter would show."""
    from kvtier.transfer.blocks import IndexStaging

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    caches, loads = _setup(seed=7)
    st = IndexStaging()
    lay = detect_layout(caches[0], block_size=BS)
    want = _expected(caches, loads)
    blocks = ([30, 3, 17, 8, 22, 11, 5, 36], [1, 9, 25, 14])
    spans = ((4, 28), (0, 16))
    on_dev = [
        LoadPieces(
            token_index(blk, 0, a, b, BS, dev, st), [(kv.pin_memory(), x, y) for kv, x, y in ld.pieces]
        )
        for blk, (a, b), ld in zip(blocks, spans, loads, strict=True)
    ]
    dcaches = [c.to(dev) for c in caches]
    torch.cuda._sleep(20_000_000)
    _run_on_cuda(
        GroupedLoad(lay, on_dev, L, dev, group_layers=group_layers, copy_streams=copy_streams), dcaches, want
    )


def test_streamed_load_fed_chunk_by_chunk_with_a_short_request_is_bit_exact() -> None:
    """``GroupedLoad.streamed``: planned from sizes, fed piece by piece, attached with what made
    it: load A lost its last two chunks (a validation failure) and its second is trimmed to one
    block, one planned request got nothing (its row stays empty), load B is whole."""
    caches, loads = _setup(seed=3)
    lay = detect_layout(caches[0], block_size=BS)
    a, b = loads
    kv0, kv1 = a.pieces[0][0], a.pieces[1][0]
    short = LoadPieces(
        token_index([30, 3, 17, 8, 22, 11, 5, 36], 0, 4, 12, BS, CPU), [(kv0, 4, 8), (kv1, 0, 4)]
    )
    want = [c.clone() for c in caches]
    for i in range(L):
        for ld in (short, b):
            scatter_pieces(lay, want[i], ld.idx, [kv[i, :, x:y] for kv, x, y in ld.pieces])
    geometry = [
        [(int(kv.shape[2]), x, y) for kv, x, y in a.pieces],
        [(CT, 0, CT)],  # a request whose chunk never arrives
        [(int(kv.shape[2]), x, y) for kv, x, y in b.pieces],
    ]
    gl = GroupedLoad.streamed(lay, geometry, L, CPU, group_layers=2)
    assert gl is not None
    assert gl.feed(0, kv0) and gl.feed(1, kv1) and gl.feed(2, a.pieces[2][0])  # fed, then dropped
    assert not gl.feed(5, torch.zeros(L, 2, 3, H, D))  # not the planned size: refused
    assert gl.feed(5, b.pieces[0][0]) and gl.feed(6, b.pieces[1][0])
    assert gl.attach([(0, short), (2, b)])
    for i in range(L):
        gl.layer(i, caches[i])
    gl.wait()
    for i in range(L):
        assert bits_equal(caches[i], want[i]), f"layer {i} differs"
    assert gl.grouped_layers == L


@pytest.mark.parametrize("rows2d", [True, False])
def test_fed_chunks_copy_group_0_only_and_attach_copies_group_1_for_the_kept_pieces(
    rows2d: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While chunks stream in only group 0 is copied, so it completes before the last chunk
    arrives and its scatter overlaps group 1's DMA (feeding both groups interleaved their DMAs:
    both ended together and the copy engine idled during group 0's scatter). Group 1 follows at
    ``attach``, for the kept pieces only. The result stays bit-exact."""
    import kvtier.transfer.grouped as gr

    monkeypatch.setattr(gr, "ROWS2D", rows2d)
    caches, loads = _setup(seed=5)
    lay = detect_layout(caches[0], block_size=BS)
    a, b = loads
    want = _expected(caches, [b])
    geometry = [[(int(kv.shape[2]), x, y) for kv, x, y in ld.pieces] for ld in (a, b)]
    gl = GroupedLoad.streamed(lay, geometry, L, CPU, group_layers=2)
    assert gl is not None and gl.num_groups == 3
    ring0, ring1 = gl._ring[0], gl._ring[1]
    assert ring0 is not None and ring1 is not None
    sentinel = -123456789  # an int32 bit pattern random chunk bits hit with p = 2**-32 per element
    ring0.view(torch.int32).fill_(sentinel)
    ring1.view(torch.int32).fill_(sentinel)
    for i, (kv, _, _) in enumerate(a.pieces + b.pieces):
        assert gl.feed(i, kv)
    gl._flush()  # the last partial batch
    written0 = int((ring0[: gl._group_elems].view(torch.int32) != sentinel).sum())
    assert written0 == gl._group_elems, "group 0 is copied as chunks are fed"
    assert bool((ring1.view(torch.int32) == sentinel).all()), "group 1 waits for attach"
    assert gl.attach([(1, b)])  # load A dropped (e.g. its first chunk failed validation)
    b_elems = sum(int(kv.shape[2]) for kv, _, _ in b.pieces) * 2 * H * D * gl.group_layers
    written1 = int((ring1[: gl._group_elems].view(torch.int32) != sentinel).sum())
    assert written1 == b_elems, "group 1 holds the kept pieces only"
    for i in range(L):
        gl.layer(i, caches[i])
    gl.wait()
    for i in range(L):
        assert bits_equal(caches[i], want[i]), f"layer {i} differs"
    assert gl.grouped_layers == L


def test_streamed_plan_refuses_unaligned_pieces_and_attach_refuses_other_chunks() -> None:
    caches, loads = _setup(seed=4)
    lay = detect_layout(caches[0], block_size=BS)
    assert GroupedLoad.streamed(lay, [[(CT, 2, CT)]], L, CPU) is None
    assert GroupedLoad.streamed(lay, [[], []], L, CPU) is None
    a = loads[0]
    gl = GroupedLoad.streamed(lay, [[(int(kv.shape[2]), x, y) for kv, x, y in a.pieces]], L, CPU)
    assert gl is not None
    for j, (kv, _, _) in enumerate(a.pieces):
        assert gl.feed(j, kv)
    swapped = LoadPieces(a.idx, [a.pieces[1], a.pieces[0], *a.pieces[2:]])
    assert not gl.attach([(0, swapped)])


def _arena_loads(
    seed: int, device: torch.device, pin: bool = False
) -> tuple[list[torch.Tensor], list[LoadPieces], list[list[torch.Tensor]]]:
    """Two loads whose chunks are views of one host arena, as the CPU tier lays them out: load A
    takes arena slots 0, 1, 2 (equally spaced: one run), then 4 (a gap: a new run); load B slots
    6, 5 (descending: runs of one)."""
    g = torch.Generator().manual_seed(seed)
    caches = [random_bits((2, NB, BS, H, D), torch.float32, "cpu", g) for _ in range(L)]
    arena = random_bits((7, L, 2, CT, H, D), torch.float32, "cpu", g)
    if pin:
        arena = arena.pin_memory()
    a_chunks = [arena[0], arena[1], arena[2], arena[4]]
    b_chunks = [arena[6], arena[5]]
    a = LoadPieces(
        token_index([30, 3, 17, 8, 22, 11, 5, 36], 0, 0, 32, BS, device), [(c, 0, CT) for c in a_chunks]
    )
    b = LoadPieces(token_index([1, 9, 25, 14], 0, 0, 16, BS, device), [(c, 0, CT) for c in b_chunks])
    return caches, [a, b], [a_chunks, b_chunks]


def _run_on_cuda(gl: GroupedLoad, dcaches: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Every layer through the ring into the device caches, then each equal to the reference."""
    for i in range(L):
        gl.layer(i, dcaches[i])
    gl.wait()
    torch.cuda.synchronize()
    assert gl.grouped_layers == L
    for i in range(L):
        assert bits_equal(dcaches[i].cpu(), want[i]), f"layer {i} differs"


def _ring(lay: Any, loads: list[LoadPieces], device: torch.device, streamed: bool) -> GroupedLoad:
    """A 2-layer-group ring over whole-chunk ``loads``: all pieces at once, or planned from sizes
    and fed piece by piece then attached (the worker's streamed way)."""
    if not streamed:
        return GroupedLoad(lay, loads, L, device, group_layers=2)
    gl = GroupedLoad.streamed(
        lay, [[(CT, 0, CT)] * len(ld.pieces) for ld in loads], L, device, group_layers=2
    )
    assert gl is not None
    i = 0
    for ld in loads:
        for kv, _, _ in ld.pieces:
            assert gl.feed(i, kv)
            i += 1
    assert gl.attach(list(enumerate(loads)))
    return gl


@pytest.mark.parametrize("rows2d", [True, False])
@pytest.mark.parametrize("streamed", [True, False])
def test_equally_spaced_chunks_move_as_one_2d_run_and_land_bit_exact(
    rows2d: bool, streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks equally spaced in one arena go as one 2D copy per group (rows at their pitch); a change
    of pitch or a descending neighbour starts a new run; with ``ROWS2D`` off, one copy per piece. Either
    way every layer equals the per-layer path."""
    from kvtier.transfer import grouped

    monkeypatch.setattr(grouped, "ROWS2D", rows2d)
    monkeypatch.setattr(grouped, "FEED_BATCH", 3)  # a batch boundary inside load A's first run
    monkeypatch.setattr(grouped, "FIRST_FEED_BATCH", 3)
    heights: list[int] = []
    real = grouped.copy_rows

    def counting(run, stream, copier):  # type: ignore[no-untyped-def]
        heights.append(run.height)
        real(run, stream, copier)

    monkeypatch.setattr(grouped, "copy_rows", counting)
    caches, loads, _ = _arena_loads(seed=11, device=CPU)
    lay = detect_layout(caches[0], block_size=BS)
    want = _expected(caches, loads)
    gl = _ring(lay, loads, CPU, streamed)
    for i in range(L):
        gl.layer(i, caches[i])
    gl.wait()
    for i in range(L):
        assert bits_equal(caches[i], want[i]), f"layer {i} differs"
    if not rows2d:
        assert heights == []
        return
    # ring order is load order (all pieces whole chunks), arena slots 0 1 2 | 4 6 | 5: slots 0-2 at
    # pitch 1, then 4 and 6 at pitch 2 (a run of two), 5 going back (alone). Streamed with batches
    # of 3 the cuts fall at the same places ((0 1 2), (4 6 | 5)); every group: runs of 3, 2, 1.
    assert sorted(heights) == sorted([3, 2, 1] * -(-L // 2))


@pytest.mark.gpu
@pytest.mark.parametrize("streamed", [True, False])
def test_2d_runs_on_cuda_from_a_pinned_arena_are_bit_exact(
    streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same arena loads on CUDA through ``cudaMemcpy2DAsync`` (the runtime torch loaded): the
    compute stream is held back by a sleep kernel, so a missing wait between a 2D DMA and its
    scatter, or a wrong pitch, would show in the bits."""
    from kvtier.devcopy2d import Copy2D
    from kvtier.transfer import grouped
    from kvtier.transfer.blocks import IndexStaging

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert Copy2D().why_not is None, Copy2D().why_not
    monkeypatch.setattr(grouped, "FEED_BATCH", 3)  # batches of 1, 2, 3: cuts inside the runs
    dev = torch.device("cuda")
    caches, host_loads, _ = _arena_loads(seed=12, device=CPU, pin=True)
    lay = detect_layout(caches[0], block_size=BS)
    want = _expected(caches, host_loads)
    st = IndexStaging()
    blocks = ([30, 3, 17, 8, 22, 11, 5, 36], [1, 9, 25, 14])
    loads = [
        LoadPieces(token_index(blk, 0, 0, len(blk) * BS, BS, dev, st), ld.pieces)
        for blk, ld in zip(blocks, host_loads, strict=True)
    ]
    dcaches = [c.to(dev) for c in caches]
    torch.cuda._sleep(20_000_000)
    gl = _ring(lay, loads, dev, streamed)
    assert gl._rows2d
    _run_on_cuda(gl, dcaches, want)


def test_a_second_load_reuses_the_first_loads_ring_buffers_and_is_bit_exact() -> None:
    """``recycle`` hands the ring to the next load (no new device buffer per step); the second
    load, of other chunks into the same blocks, overwrites every byte the first one left."""
    from kvtier.transfer import grouped

    grouped._SPARE.clear()
    first_caches, first_loads, _ = _arena_loads(seed=21, device=CPU)
    caches, loads, _ = _arena_loads(seed=22, device=CPU)
    lay = detect_layout(caches[0], block_size=BS)
    want = _expected(caches, loads)
    gl = GroupedLoad(lay, first_loads, L, CPU, group_layers=2)
    for i in range(L):
        gl.layer(i, first_caches[i])
    gl.wait()
    ptrs = {b.data_ptr() for b in gl._bases}
    gl.recycle()
    gl2 = GroupedLoad(lay, loads, L, CPU, group_layers=2)
    assert {b.data_ptr() for b in gl2._bases} == ptrs
    for i in range(L):
        gl2.layer(i, caches[i])
    gl2.wait()
    gl2.recycle()
    for i in range(L):
        assert bits_equal(caches[i], want[i]), f"layer {i} differs"
    assert len(grouped._SPARE[(str(CPU), torch.float32)]) <= grouped.RING


def test_a_2d_copy_the_runtime_refuses_is_copied_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """``copy_rows`` with a copier that raises ``Copy2DError`` (the runtime refusing a pitch):
    the same rows land through torch views, and the load stays bit-exact (never a failed load)."""
    from kvtier import devcopy2d
    from kvtier.devcopy2d import Copy2D, Copy2DError, Rows, copy_rows

    class Refusing(Copy2D):
        def __init__(self) -> None:
            self._fn, self.why_not = None, None

        def copy(self, *a: object) -> None:
            raise Copy2DError("cudaMemcpy2DAsync failed with error 1 (test)")

    monkeypatch.setattr(devcopy2d, "_warned", False)
    src = torch.arange(4 * 24, dtype=torch.uint8).view(4, 24)
    dst = torch.zeros(4, 10, dtype=torch.uint8)
    run = Rows(src, src.data_ptr() + 2, dst, dst.data_ptr(), 8)
    for h in range(1, 4):
        assert run.extend(src, src.data_ptr() + 2 + 24 * h, dst, dst.data_ptr() + 10 * h, 8)
    copy_rows(run, None, Refusing())
    assert torch.equal(dst[:, :8], src[:, 2:10]) and int(dst[:, 8:].sum()) == 0
