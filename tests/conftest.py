"""Shared test helpers. GPU tests carry @pytest.mark.gpu and skip cleanly without CUDA."""
import shutil

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_NVCC = shutil.which("nvcc") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (kernels cannot run on this machine)")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc to compile kernels")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "nvcc" in item.keywords and not HAS_NVCC:
            item.add_marker(skip_nvcc)


def pytest_configure(config):
    config.addinivalue_line("markers", "nvcc: needs nvcc (kernel build / PTX checks)")


def capture_graph(fn):
    """Warm fn up on a side stream (as CUDA-graph capture requires), then capture one call of it.
    Returns (graph, what fn returned during capture: the tensors each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def random_with_outliers(shape, dtype, device, gen=None, scale=1.0):
    """Normal values with a few large outliers (catches overflow and reduction mistakes)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    flat = x.view(-1)
    if flat.numel() >= 8:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 1000),), generator=gen)
        flat[idx] *= 30.0
    return x.to(dtype=dtype, device=device)


@pytest.fixture
def fresh_dynamo():
    """Tests that compile the same HF forwards again start from an empty Dynamo cache (recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
