"""The copy kernels under ``kvtier.transfer``: paged gather/scatter (Triton on CUDA, with a
bit-exact torch reference everywhere else), the host<->GPU paths, and RoPE re-rotation kernels.

Triton is imported lazily, only when a CUDA tensor is moved; on CPU everything runs in torch.
"""

from kvtier.transfer.kernels.host import gather, scatter
from kvtier.transfer.kernels.ops import triton_available

__all__ = ["gather", "scatter", "triton_available"]
