"""How the H2D / D2H copy engine's rate depends on the DMA shape (issue 21, worker load/save rows).

    PYTHONPATH=src python benchmarks/bench_dma_shapes.py

4 GiB moved between a pinned host arena of 128 chunks x 32 MiB ([L=32, 2, 256, 8, 128] bf16,
adjacent, as the CPU tier's first-fit pool lays out chunks stored one after another) and device
memory, each variant a median of 5 runs, with the one-call memcpy of the same bytes as anchor:

* ``flat``: one copy of the whole 4 GiB (the anchor)
* ``per piece, G layers``: one ``copy_`` per chunk per group of G layers (G MiB each): the worker's
  grouped load ring today
* ``2D, G layers``: one ``cudaMemcpy2DAsync`` per group of G layers over all 128 chunks (rows of
  G MiB at a 32 MiB pitch): the same bytes, one DMA call per group
* the same on two copy streams taking alternate groups.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from bench_blend_attn_gpu import timed  # the same CUDA-event median timer

from kvtier.devcopy2d import Copy2D

CHUNKS, LAYERS, CHUNK_BYTES = 128, 32, 32 << 20
LAYER_BYTES = CHUNK_BYTES // LAYERS


def main() -> None:
    total = CHUNKS * CHUNK_BYTES
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    host.view(torch.int32)[:: 1 << 16] = 7  # touch
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    main_s = torch.cuda.current_stream()
    sides = [torch.cuda.Stream(), torch.cuda.Stream()]
    c2d = Copy2D()
    res: dict[str, float | str] = {"copy2d": c2d.why_not or "available"}

    def on_sides(jobs: list[Callable[[torch.cuda.Stream], None]], streams: int) -> None:
        ev = torch.cuda.Event()
        ev.record(main_s)
        for s in sides[:streams]:
            s.wait_event(ev)
        for i, job in enumerate(jobs):
            job(sides[i % streams])
        for s in sides[:streams]:
            e = torch.cuda.Event()
            e.record(s)
            main_s.wait_event(e)

    for direction in ("h2d", "d2h"):
        src, dst = (host, dev) if direction == "h2d" else (dev, host)
        ms = timed(lambda src=src, dst=dst: dst.copy_(src, non_blocking=True), n=5)
        res[f"{direction} flat ms"] = ms
        anchor = ms
        for g in (1, 2, 4, 8):
            w = g * LAYER_BYTES

            def piece_jobs(
                g: int = g, w: int = w, direction: str = direction
            ) -> list[Callable[[torch.cuda.Stream], None]]:
                jobs = []
                for grp in range(LAYERS // g):

                    def job(s: torch.cuda.Stream, grp: int = grp, direction: str = direction) -> None:
                        with torch.cuda.stream(s):
                            for c in range(CHUNKS):
                                so = c * CHUNK_BYTES + grp * w
                                do = grp * CHUNKS * w + c * w
                                if direction == "h2d":
                                    dev[do : do + w].copy_(host[so : so + w], non_blocking=True)
                                else:
                                    host[so : so + w].copy_(dev[do : do + w], non_blocking=True)

                    jobs.append(job)
                return jobs

            def twod_jobs(
                g: int = g, w: int = w, direction: str = direction
            ) -> list[Callable[[torch.cuda.Stream], None]]:
                jobs = []
                for grp in range(LAYERS // g):

                    def job(s: torch.cuda.Stream, grp: int = grp, direction: str = direction) -> None:
                        hp = host.data_ptr() + grp * w
                        dp = dev.data_ptr() + grp * CHUNKS * w
                        if direction == "h2d":
                            c2d.copy(dp, w, hp, CHUNK_BYTES, w, CHUNKS, s)
                        else:
                            c2d.copy(hp, CHUNK_BYTES, dp, w, w, CHUNKS, s)

                    jobs.append(job)
                return jobs

            for streams in (1, 2):
                ms = timed(lambda streams=streams: on_sides(piece_jobs(), streams), n=5)
                res[f"{direction} per piece G={g} streams={streams} x"] = anchor / ms
                if c2d.why_not is None:
                    ms = timed(lambda streams=streams: on_sides(twod_jobs(), streams), n=5)
                    res[f"{direction} 2D G={g} streams={streams} x"] = anchor / ms
    for a, b in res.items():
        print(f"{a}: {round(b, 3) if isinstance(b, float) else b}", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
