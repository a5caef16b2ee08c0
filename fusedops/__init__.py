"""fusedops: fused CUDA kernels for Llama-family models behind torch.compile(backend="fusedops")."""
from . import ops  # noqa: F401  (registers torch.ops.fusedops.*)

__version__ = "0.1.0"
