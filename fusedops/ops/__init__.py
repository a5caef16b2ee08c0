"""The fusedops custom ops (torch.ops.fusedops.*). Importing this package registers them all.

Each module holds one op family: the torch.library custom op, its CPU reference (plain PyTorch,
HF's own arithmetic), its fake impl for tracing, and its CUDA kernel launch."""
from . import add_rmsnorm, attention, attention_decode, gemm, rmsnorm, rope, silu_mul  # noqa: F401
from . import layernorm, softmax, transpose  # noqa: F401
from . import gemm_w4  # noqa: F401

__all__ = ["add_rmsnorm", "attention", "attention_decode", "gemm", "rmsnorm", "rope", "silu_mul", "layernorm", "softmax",
           "transpose", "gemm_w4"]
