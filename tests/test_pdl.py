"""Programmatic dependent launch (csrc/common/pdl.cuh, fusedops/runtime/driver.py): a kernel may start
before its predecessor on the stream has finished, so every kernel waits in-kernel before touching data.
These tests run a decode-like chain in which each op reads the previous op's output (and a torch op sits
in between) and require bit-identical results with early launch on and off, eagerly and in a CUDA graph."""
import pytest
import torch

from conftest import capture_graph
from fusedops.runtime import driver, registry

OPS = torch.ops.fusedops
HIDDEN = 4096


def chain(x, residual, weights, norm_weight, steps=24):
    for i in range(steps):
        h, residual = OPS.add_rms_norm(x, residual, norm_weight, 1e-6)
        y = OPS.linear(h, weights[i % len(weights)])          # GEMV at one token
        y = y * 0.5                                             # a torch kernel between two of ours
        x = OPS.rms_norm(y, norm_weight, 1e-6)
    return x, residual


@pytest.fixture
def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()
    weights = [rand(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5) for _ in range(3)]
    return rand(1, HIDDEN), rand(1, HIDDEN), weights, 1 + rand(HIDDEN, scale=0.1)


@pytest.fixture
def restore_pdl():
    before = driver.pdl_enabled()
    yield
    driver.set_pdl(before)


@pytest.mark.gpu
def test_kernels_are_marked_for_early_launch_on_sm90():
    from fusedops.ops import rmsnorm
    kernel = registry.get_kernel(rmsnorm.SOURCE, "rmsnorm_bf16_c1", rmsnorm.RmsNormParams, torch.device("cuda"))
    assert kernel.pdl == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.gpu
def test_dependent_chain_identical_with_and_without_early_launch(inputs, restore_pdl):
    x, residual, weights, norm_weight = inputs
    results = {}
    for pdl in (False, True):
        driver.set_pdl(pdl)
        results[f"eager pdl={pdl}"] = chain(x, residual, weights, norm_weight)
        graph, out = capture_graph(lambda: chain(x, residual, weights, norm_weight))
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[f"graph pdl={pdl}"] = out
    want = results["eager pdl=False"]
    assert torch.isfinite(want[0].float()).all() and want[0].float().abs().max() > 0
    for name, got in results.items():
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
