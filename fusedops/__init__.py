"""fusedops: fused CUDA kernels for Llama-family models behind torch.compile(backend="fusedops")."""
from . import ops  # noqa: F401  (registers torch.ops.fusedops.*)
from .explain import explain

__all__ = ["explain"]

__version__ = "0.1.0"
