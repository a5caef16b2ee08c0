"""fusedops: fused CUDA kernels for Llama-family models behind torch.compile(backend="fusedops")."""
from . import ops  # noqa: F401  (registers torch.ops.fusedops.*)
from .explain import explain
from .loader import load_safetensors


def _register_backend_name() -> None:
    """backend="fusedops" comes from the torch_dynamo_backends entry point once the package is
    installed; a checkout used from PYTHONPATH has no entry point, so importing fusedops names it then."""
    from importlib.metadata import entry_points

    if any(ep.name == "fusedops" for ep in entry_points(group="torch_dynamo_backends")):
        return  # torch loads it through the entry point (registering here too would be a duplicate)
    from torch._dynamo.backends import registry

    from .backend import fusedops_backend
    if "fusedops" not in registry._COMPILER_FNS:
        registry.register_backend(fusedops_backend, name="fusedops")


_register_backend_name()

__all__ = ["explain", "load_safetensors"]

__version__ = "0.1.0"
