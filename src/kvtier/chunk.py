"""One chunk of KV as every layer sees it, and the one spelling of KV dtype names.

A leaf module (imports nothing of kvtier's but ``errors``): the tiers, serde, the wire protocol
and the engine all pass ``Chunk`` records, so it cannot live in any one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import torch

from kvtier.errors import KVTierError


class DTypeError(KVTierError, ValueError):
    """A KV dtype name kvtier does not know."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in namespaces, headers and messages)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; raises ``DTypeError`` for anything else."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise DTypeError(f"unknown KV dtype {name!r}")
    return dt


@dataclass
class Chunk:
    """One chunk of KV plus what a reader needs to validate it.

    ``kv`` has layout ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``; on ``put`` it may
    be a strided view into a larger tensor and may live on a GPU (a tier copies it, to host
    first if it serialises); on ``get`` it is on the CPU and may be a view into tier memory.
    ``fingerprint`` is ``keys.fingerprint`` of the chunk's own tokens, shape and dtype.
    """

    kv: torch.Tensor
    fingerprint: bytes
    num_tokens: int
    _on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give back any tier memory this chunk views; idempotent."""
        cb, self._on_release = self._on_release, None
        if cb is not None:
            cb()

    def __enter__(self) -> Chunk:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
