"""GPU data path: paged KV gather/scatter (Triton, with a bit-exact torch fallback) and RoPE re-rotation.

Triton is imported lazily, only when a CUDA tensor is moved; on CPU everything runs in torch.
"""

from kvtier.gpu.ops import triton_available
from kvtier.gpu.transfer import gather, scatter

__all__ = ["gather", "scatter", "triton_available"]
