"""Flex attention for the blend's selected-token layers: a block mask from sorted query positions.

After the check layer a blend computes a sparse, sorted set of queries (``rows``, a few thousand of
tens of thousands of positions) over every key of the prompt, query ``i`` seeing keys
``[0, rows[i]]``. SDPA can only take that as a dense ``[n, S]`` additive mask (every key block
visited, the mask read from memory, and transformers repeats the KV heads for GQA when a mask is
given). ``torch.nn.attention.flex_attention`` skips the key blocks a whole query block cannot
see, reads no mask for the blocks it sees entirely, and reads grouped KV heads in place: on an
H200 (Llama-3-8B shape, 2,514 queries over 16,440 keys) 1.59 ms against 2.39 ms per layer
(``bench_blend_attn_gpu.py``).

* ``SelectedRows``: the attention mask object ``blend_forward`` hands the layers instead of the dense
  mask. Its ``BlockMask`` is built directly (``block_mask``): per block of 128 queries, the key
  blocks ending at or before the block's first position are *full*, the ones up to its last
  position *partial* (``kv <= rows[q]`` evaluated there), the rest skipped. A few vectorised ops
  on ``[n / 128, S / 128]`` integers, no device synchronisation; ``create_block_mask`` evaluates
  the mask per element (8.7 ms per call on the H200).
* transformers' ``"sdpa"`` attention entry is wrapped (``install``): a ``SelectedRows`` mask goes
  to flex, anything else to the function that was registered, untouched. kvtier does not change a
  model's ``attn_implementation``; other models and requests never see a difference.
* The kernel (``kernel``): on CUDA ``torch.compile(flex_attention, dynamic=True)``, compiled once
  per process (query and key counts change every request; static shapes would recompile each
  time), with the compiler's default mode as a second try (``CompiledFlex``), aligned inputs
  assumed (``COMPILE_OPTIONS``); elsewhere flex's eager reference (correct, unfused: for tests; on
  CPU torch 2.13 the compiled dynamic kernel does not build, and a static one recompiles per shape).
* ``attention="auto"`` (the default) on CUDA: a request whose kernel is not built yet uses the
  dense mask and starts building it on a background thread (``auto_kernel``, per ``Signature``);
  later requests use flex. ``wait_ready`` waits for the builds; ``warm_up`` builds one now. The
  build holds the GIL much of its ~5 s, so requests running beside it are slowed (not blocked).

Invariants:
* Same attention as the dense mask: the block mask's dense form equals ``kv <= rows[q]`` (tested
  against ``create_block_mask``), padded queries (the last block's tail) read a real position.
* A flex failure never fails a request: ``blend_forward`` recomputes the layer with the dense
  mask (the layer's inputs are unchanged, its rows are rewritten with the same values), and
  ``disable`` logs one warning and turns the automatic choice off for the process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import KVTierError

log = logging.getLogger(__name__)

BLOCK = 128
"""Flex's default sparse block. 64 failed to compile on the H200 (torch's Triton template needs the
block to be a multiple of its own tile), and 128 queries is under 1 % of a blend's selected rows."""


def serves(k: Kernel, n_queries: int, n_keys: int) -> bool:
    """Whether ``k`` runs ``n_queries`` selected rows over ``n_keys`` keys without a new compile. A
    compiled kernel (``CompiledFlex``) is specialised to more than one block of each: its guards
    include ``128 <= queries`` (fewer go to torch's flex-decoding template) and ``2 <= query
    blocks`` (H200, torch 2.11, s8e: a warmed kernel recompiled for 5, 84, 127 and 128 queries, and
    the decoding template found no kernel for the tests' tiny model: ``NoValidChoicesError``).
    Such small selections take the dense mask, which costs little at that size; the eager
    reference (CPU, tests) serves any size."""
    if not isinstance(k, CompiledFlex):
        return True
    return n_queries > BLOCK and n_keys > BLOCK


ATTENTIONS = ("auto", "flex", "mask")
"""``blend_forward``'s ``attention`` choices: ``auto`` is flex on CUDA if ``AUTO_FLEX``, not disabled and built
(``auto_kernel``), ``flex``
is flex wherever it runs (tests), ``mask`` the dense additive mask."""

Kernel = Callable[..., torch.Tensor]

_lock = threading.Lock()
_kernels: dict[str, Kernel] = {}  # device type -> flex callable (compiled on CUDA)
_disabled: str | None = None  # why ``auto`` no longer picks flex in this process


class FlexUnsupported(KVTierError, RuntimeError):
    """The attention call asks for something the flex path does not do (a position bias); the
    caller falls back to the dense mask."""


def available() -> bool:
    """``torch.nn.attention.flex_attention`` (with ``BlockMask.from_kv_blocks``) can be imported."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return hasattr(BlockMask, "from_kv_blocks")


def disabled() -> str | None:
    """Why ``auto`` falls back to the dense mask in this process (``None``: it does not)."""
    return _disabled


def disable(reason: BaseException | str) -> None:
    """Stop ``auto`` from choosing flex for the rest of the process. A fault (an exception) logs one
    warning the first time; a string is an operator's choice (a benchmark's dense-mask variant)."""
    global _disabled
    with _lock:
        first = _disabled is None
        _disabled = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"[:500]
    if first and isinstance(reason, BaseException):
        log.warning("blend: flex attention failed, using the dense mask from now on (%s)", _disabled)
    elif first:
        log.info("blend: flex attention off (%s)", _disabled)


def enable() -> None:
    """Undo ``disable`` (tests, or an operator who fixed the cause)."""
    global _disabled
    with _lock:
        _disabled = None


def wanted(attention: str, device: torch.device, impl: str) -> bool:
    """Whether ``blend_forward`` builds ``SelectedRows`` masks for ``attention`` on ``device``."""
    if attention not in ATTENTIONS:
        from kvtier.blend.plan import BlendError

        raise BlendError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "mask" or impl != "sdpa" or not available():
        return False
    if attention == "flex":
        return True
    return AUTO_FLEX and device.type == "cuda" and _disabled is None


AUTO_FLEX = True
"""Whether ``attention="auto"`` picks flex on CUDA once its kernel is built (``auto_kernel``). H200,
Llama-3-8B shape, 8 x 2k documents, 15 %: blend 162 ms with flex vs 190 ms with the dense mask
(paired flex gain 1.18x; RESULTS.md, session 8). Before the kernel was compiled aligned it gained
nothing (0.97-0.99x) and stayed off."""


@dataclass(frozen=True)
class Signature:
    """What one compiled flex kernel is specialised to: the shapes that do not change between
    requests (head counts, head size), dtype, device, the softmax scale and whether the caller is
    in inference mode (its tensors carry other dispatch keys). Another value of any of them makes
    torch recompile, so ``auto_kernel`` builds and tracks each signature on its own."""

    device: str
    dtype: torch.dtype
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float | None
    inference: bool


_states: dict[Signature, str] = {}  # "building" | "ready" | "failed"
_threads: dict[Signature, threading.Thread] = {}


def auto_kernel(sig: Signature) -> Kernel | None:
    """``attention="auto"``'s flex callable for calls of ``sig``: the kernel once a warm-up has built
    it, else ``None`` (this request uses the dense mask) after starting that warm-up on a background
    thread, once per signature. So no request waits for the compile (10-12 s on the H200: the
    first request paid it before), and every request after it gets flex. A warm-up that fails
    disables flex (``disable``: one warning), as a failing call would."""
    with _lock:
        state = _states.get(sig)
        if state is None:
            _states[sig] = "building"
            t = threading.Thread(target=_warm_up, args=(sig,), name="kvtier-flex-warmup", daemon=True)
            _threads[sig] = t
            t.start()
    return kernel(torch.device(sig.device)) if state == "ready" else None


def warm_up(sig: Signature, timeout: float | None = None) -> bool:
    """Build ``sig``'s kernel now (a server's start-up: the build is Python-heavy and slows whatever
    runs beside it, so do it before requests arrive); ``True`` if it is ready."""
    auto_kernel(sig)
    with _lock:
        t = _threads.get(sig)
    if t is not None:
        t.join(timeout)  # this signature's build only (``wait_ready`` waits for every one)
    with _lock:
        return _states.get(sig) == "ready"


def wait_ready(timeout: float | None = None) -> bool:
    """Wait for every started warm-up (a benchmark, or a server's start-up); ``True`` if all ended."""
    with _lock:
        threads = list(_threads.values())
    for t in threads:
        t.join(timeout)
    return not any(t.is_alive() for t in threads)


def _warm_up(sig: Signature) -> None:
    """Build ``sig``'s kernel with one call shaped like a blend's: transformers' query storage
    (``[1, n, H, D]`` seen as ``[1, H, n, D]``), K/V as views into one buffer at nonzero offsets,
    sorted rows. NOTE: the offsets matter: torch specialises a storage offset of 0, so a kernel
    warmed with offset-0 K/V recompiled on the first real call (K/V of layer >= 1 of the
    ``KVBuffer``): 0.5-1.5 s inside that request (H200, s8c)."""
    dev = torch.device(sig.device)
    state = "failed"
    try:
        k = kernel(dev)
        n, seq = 333, 2111  # any sizes ``serves`` admits: the kernel is dynamic in both
        mode = torch.inference_mode() if sig.inference else torch.no_grad()
        on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        with on_device, mode:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(1, n, sig.q_heads, sig.head_dim, device=dev, dtype=sig.dtype, generator=g)
            buf = torch.randn(3, 1, sig.kv_heads, seq, sig.head_dim, device=dev, dtype=sig.dtype, generator=g)
            rows = torch.randperm(seq, device=dev, generator=g)[:n].sort().values
            SelectedRows(rows, seq, k).attend(q.transpose(1, 2), buf[1], buf[2], sig.scale)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        state = "ready"
    except Exception as exc:  # the compile (or the device) failed: auto stays on the mask, logged once
        disable(exc)
    finally:
        with _lock:
            _states[sig] = state


def kernel(device: torch.device) -> Kernel:
    """The flex callable for ``device`` (compiled once per process on CUDA; see the module doc)."""
    with _lock:
        k = _kernels.get(device.type)
        if k is None:
            from torch.nn.attention.flex_attention import flex_attention

            k = CompiledFlex() if device.type == "cuda" else flex_attention
            _kernels[device.type] = k
        return k


COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"assume_aligned_inputs": True}
"""Inductor options for the flex kernel. With ``dynamic=True`` a tensor's storage offset is symbolic, so
Inductor cannot prove that K/V given as views of the blend's ``KVBuffer`` (layer ``i``'s keys start
``i`` layers into it) are 16-byte aligned and builds the kernel without alignment hints: 2.26 ms
per selected layer against 1.50 ms for the same K/V cloned (H200, ``bench_blend_flex_tune.py``, s8a).
``assume_aligned_inputs`` generates the aligned kernel and clones any input that is not aligned at
run time (never the case for the buffer's views: every layer and plane starts at a multiple of
``S * D`` elements), so results are the same either way."""


class CompiledFlex:
    """``flex_attention`` compiled with ``dynamic=True`` (one kernel for every request's query and key
    counts); if that compile fails, once, ``torch.compile``'s default (static first, then dynamic
    after the first new shape: one recompile) for the same call. ``mode`` says which one serves;
    a failure of the second raises (``blend_forward`` then falls back to the dense mask)."""

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._flex = flex_attention
        self.mode = "dynamic"
        self.first_error: str | None = None
        self._fn: Kernel = torch.compile(flex_attention, dynamic=True, options=COMPILE_OPTIONS)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return self._fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # a compile fault of the dynamic kernel: try the default mode once
            if self.mode != "dynamic":
                raise
            self.first_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("blend: dynamic flex compile failed (%s); trying the default mode", self.first_error)
            self.mode = "automatic"
            self._fn = torch.compile(self._flex, options=COMPILE_OPTIONS)
            return self._fn(*args, **kwargs)


def set_kernel(device_type: str, k: Kernel | None) -> None:
    """Replace (``None``: forget) the flex callable for a device type: a different compile mode
    for a benchmark, or a failing kernel for the fallback test."""
    with _lock:
        if k is None:
            _kernels.pop(device_type, None)
        else:
            _kernels[device_type] = k


def _from_kv_blocks_kwargs() -> frozenset[str]:
    from torch.nn.attention.flex_attention import BlockMask

    return frozenset(inspect.signature(BlockMask.from_kv_blocks).parameters)


def block_mask(rows: torch.Tensor, seq: int) -> Any:
    """The ``BlockMask`` of queries at sorted positions ``rows`` over keys ``[0, seq)``: query ``i``
    sees key ``j`` iff ``j <= rows[i]`` (one mask for every batch row and head).

    Per query block ``b`` (queries ``[128 b, 128 b + 128)``, first position ``lo``, last ``hi``):
    key block ``j`` (keys ``[128 j, 128 j + 128)``) is full when ``128 j + 127 <= lo``, i.e.
    ``j < (lo + 1) // 128``; partial for ``j`` up to ``hi // 128``; empty after. The last query
    block is padded with its last position, so the mask function never reads past ``rows``."""
    from torch.nn.attention.flex_attention import BlockMask

    n = int(rows.numel())
    if n == 0 or seq <= 0:
        raise FlexUnsupported(f"block_mask needs queries and keys, got {n} queries over {seq} keys")
    dev = rows.device
    nq, nkv = -(-n // BLOCK), -(-seq // BLOCK)
    pad = nq * BLOCK - n
    pos = torch.cat([rows, rows[-1:].expand(pad)]) if pad else rows
    pos = pos.to(torch.int32).contiguous()
    blocks = pos.view(nq, BLOCK)
    full = torch.div(blocks[:, 0] + 1, BLOCK, rounding_mode="floor")
    touched = torch.div(blocks[:, -1], BLOCK, rounding_mode="floor") + 1  # key blocks [0, touched)
    ar = torch.arange(nkv, device=dev, dtype=torch.int32)
    full_idx = ar.expand(nq, nkv).contiguous()
    # NOTE: entries past each row's count are never read; clamping keeps them valid block indices.
    part_idx = (full[:, None] + ar[None, :]).clamp_max_(nkv - 1)

    def causal_at(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= pos[q_idx]

    kwargs: dict[str, Any] = {"BLOCK_SIZE": BLOCK, "mask_mod": causal_at}
    names = _from_kv_blocks_kwargs()
    if "seq_lengths" in names:
        kwargs["seq_lengths"] = (n, seq)
    if "compute_q_blocks" in names:
        kwargs["compute_q_blocks"] = False  # the transposed (query-major) index serves backward only
    return BlockMask.from_kv_blocks(
        (touched - full).to(torch.int32)[None, None],
        part_idx.to(torch.int32)[None, None],
        full.to(torch.int32)[None, None],
        full_idx[None, None],
        **kwargs,
    )


class SelectedRows:
    """The selected layers' attention mask when flex runs them: queries at sorted positions ``rows``
    over keys ``[0, seq)``, causal by position. Built once per selection, used by every layer."""

    def __init__(self, rows: torch.Tensor, seq: int, k: Kernel) -> None:
        self.rows, self.seq, self.kernel = rows, seq, k
        self.block_mask = block_mask(rows, seq)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """``[1, Hq, n, D]`` queries over ``[1, Hkv, S, D]`` keys/values -> ``[1, n, Hq, D]`` (the
        layout transformers' attention functions return)."""
        out = self.kernel(
            query,
            key,
            value,
            block_mask=self.block_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous()


def _wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
    def sdpa_or_flex(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if not isinstance(attention_mask, SelectedRows):
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
            raise FlexUnsupported("flex path: position bias / softcap not supported")
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)  # (dropout, scaling, ...)
        return attention_mask.attend(query, key, value, scaling), None

    sdpa_or_flex.kvtier_flex_inner = inner  # type: ignore[attr-defined]
    return sdpa_or_flex


def install() -> None:
    """Make transformers' ``"sdpa"`` attention entry hand ``SelectedRows`` masks to flex (idempotent;
    wraps whatever is registered now, so a later re-registration by someone else is wrapped too)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _lock:
        current = ALL_ATTENTION_FUNCTIONS["sdpa"]
        if not hasattr(current, "kvtier_flex_inner"):
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _wrap(current)
