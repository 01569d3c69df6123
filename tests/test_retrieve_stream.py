"""Retrieve copies and releases chunk by chunk (issue 21, build item 5): a prefix longer than the
disk tier's read-buffer pool recycles the pool instead of reading into fresh (pageable) tensors,
and on CUDA no buffer is released while the copy reading it may still run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import RETRIEVE_INFLIGHT_CHUNKS, CacheEngine
from kvtier.storage import READ_AHEAD
from kvtier.tiers.disk import DiskTier

L, H, D, CT, N_CHUNKS = 2, 2, 8, 16, 8
CHUNK_BYTES = L * 2 * CT * H * D * 4  # float32


def _engine(path: Path, *, promote: bool = True, pool_chunks: int = 4) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=CT,
        cpu__max_bytes="16MiB",
        cpu__pin_memory="no",
        disk__enabled=True,
        disk__path=str(path),
        disk__read_buffer_bytes=pool_chunks * CHUNK_BYTES,  # the pool holds 4 chunks, the prefix 8
        storage__promote_on_hit=promote,
        model__model_id="m",
        model__kv_dtype="float32",
        model__num_layers=L,
        model__num_kv_heads=H,
        model__head_dim=D,
    )
    return CacheEngine(cfg)


def _stored(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 30000, (CT * N_CHUNKS,), generator=g)
    kv = torch.randn((L, 2, CT * N_CHUNKS, H, D), generator=g)
    with _engine(path) as e:
        assert e.store(tokens, kv) == CT * N_CHUNKS
        assert e.flush(30)
    return tokens, kv


def _disk(e: CacheEngine) -> DiskTier:
    disk = e.storage.tiers[1]
    assert isinstance(disk, DiskTier) and disk.read_buffers is not None
    return disk


def test_retrieve_longer_than_the_read_pool_never_reads_into_fresh_tensors(tmp_path: Path) -> None:
    tokens, kv = _stored(tmp_path)
    with _engine(tmp_path, promote=False) as e:  # a fresh CPU tier: every chunk comes from disk
        pool = _disk(e).read_buffers
        assert pool is not None
        out = torch.zeros_like(kv)
        r = e.retrieve(tokens, out=out)
        assert r.num_tokens == CT * N_CHUNKS and torch.equal(out, kv)
        assert pool.failed_allocations == 0  # before: 4 of the 8 reads fell back to fresh tensors
        assert pool.used_bytes == 0  # every buffer went back
        pool.check_invariants()


def test_a_retrieve_that_stops_early_releases_everything(tmp_path: Path) -> None:
    tokens, kv = _stored(tmp_path)
    with _engine(tmp_path, promote=False) as e:
        disk = _disk(e)
        victim = e.keys(tokens)[5].digest
        assert disk.remove(victim)
        r = e.retrieve(tokens)
        assert r.num_tokens == 5 * CT and r.kv is not None and torch.equal(r.kv, kv[:, :, : 5 * CT])
        assert disk.read_buffers is not None and disk.read_buffers.used_bytes == 0


@pytest.mark.gpu
def test_cuda_retrieve_from_disk_waits_for_each_copy_before_recycling_its_buffer(tmp_path: Path) -> None:
    """The copy stream is held back (a long sleep kernel ahead of the copies), so a buffer
    released as soon as its copy is *enqueued* would be refilled with the next chunk before the
    copy ran: the result would hold later chunks' KV. Also checked: no fresh tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tokens, kv = _stored(tmp_path)
    # a CUDA retrieve holds RETRIEVE_INFLIGHT_CHUNKS + 1 chunks, the manager reads READ_AHEAD more
    # ahead: a pool of that many (6) still recycles for the 8-chunk prefix
    with _engine(tmp_path, promote=False, pool_chunks=RETRIEVE_INFLIGHT_CHUNKS + 1 + READ_AHEAD) as e:
        pool = _disk(e).read_buffers
        assert pool is not None
        out = torch.zeros(kv.shape, dtype=kv.dtype, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of every copy
        r = e.retrieve(tokens, out=out)
        torch.cuda.synchronize()
        assert r.num_tokens == CT * N_CHUNKS and torch.equal(out.cpu(), kv)
        assert pool.failed_allocations == 0 and pool.used_bytes == 0
