"""fusedops::rope and fusedops::rope_cache_write: HF apply_rotary_pos_emb semantics, bad input, PTX,
and on the GPU random sweeps against float64 on HF-layout (transposed) q/k, poisoned outputs and caches,
device-side cache positions under CUDA-graph replay."""
import random

import pytest
import torch

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import rope
from fusedops.runtime import compiler

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(x, cos, sin, interleaved):
    x, cos, sin = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    return x * cos + rope.rotate(x, interleaved) * sin


def hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def test_reference_is_hf_apply_rotary_pos_emb_rounded_once():
    q, k = torch.randn(2, 4, 5, 64).bfloat16(), torch.randn(2, 2, 5, 64).bfloat16()
    cos, sin = torch.randn(1, 5, 64).bfloat16(), torch.randn(1, 5, 64).bfloat16()
    qo, ko = torch.ops.fusedops.rope(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    for x, out in ((q, qo), (k, ko)):
        exact = x.double() * c.double() + hf_rotate_half(x.double()) * s.double()
        assert torch.equal(out, (x.float() * c.float() + hf_rotate_half(x.float()) * s.float()).bfloat16())
        eager = x * c + hf_rotate_half(x) * s   # HF in bf16: rounded after every op
        assert rel_err(out, exact) < rel_err(eager, exact)


def test_interleaved_rotation_pairs_neighbours():
    x = torch.arange(6.0).view(1, 1, 1, 6)
    assert rope.rotate(x, True).flatten().tolist() == [-1, 0, -3, 2, -5, 4]


def test_opcheck_cpu():
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    torch.library.opcheck(torch.ops.fusedops.rope, (q, k, cos, sin))
    kc, vc = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    torch.library.opcheck(torch.ops.fusedops.rope_cache_write,
                          (q, k, k.clone(), cos, sin, kc, vc, torch.tensor([2, 3, 4])))


@pytest.mark.parametrize("shapes, arg", [
    (((1, 4, 3, 16), (1, 2, 3, 8), (1, 3, 16)), "k"),
    (((1, 4, 3, 15), (1, 2, 3, 15), (1, 3, 15)), "q"),
    (((1, 4, 3, 16), (1, 2, 3, 16), (1, 4, 16)), "cos"),
])
def test_bad_shapes_name_the_argument(shapes, arg):
    q, k, c = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        torch.ops.fusedops.rope(q, k, c, c)


def test_cos_sin_in_fp32_or_q_dtype_only():
    q, k = torch.randn(1, 4, 3, 16).bfloat16(), torch.randn(1, 2, 3, 16).bfloat16()
    c32 = torch.randn(1, 3, 16)
    qo, _ = torch.ops.fusedops.rope(q, k, c32, c32)   # HF's fp32 cos/sin before their cast: accepted
    assert qo.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="^cos:"):
        torch.ops.fusedops.rope(q, k, c32.half(), c32.half())
    with pytest.raises(ValueError, match="^sin:"):
        torch.ops.fusedops.rope(q, k, c32, c32.bfloat16())
    with pytest.raises(ValueError, match="^sin:"):   # the kernel walks sin with cos's batch stride
        torch.ops.fusedops.rope(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), c32, c32.expand(2, -1, -1))


def test_bad_cache_position_dtype():
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    c, kc = torch.randn(1, 3, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="^cache_position:"):
        torch.ops.fusedops.rope_cache_write(q, k, k, c, c, kc, kc.clone(), torch.tensor([0.0, 1, 2]))


@pytest.mark.nvcc
def test_ptx_has_128bit_access():
    ptx = compiler.emit_ptx(rope.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx


# ---------------------------------------------------------------- GPU

def hf_qkv(b, s, hq, hkv, d, dtype, g, transposed=True):
    """q/k/v as HF's attention makes them: projection output viewed [B, S, H, D], transposed."""
    def one(h):
        if transposed:
            return random_with_outliers((b, s, h * d), dtype, "cuda", g).view(b, s, h, d).transpose(1, 2)
        return random_with_outliers((b, h, s, d), dtype, "cuda", g)
    return one(hq), one(hkv), one(hkv)


def random_case(rng):
    d = rng.choice([64, 128, 256, 64, 128, rng.choice([2, 6, 18, 40, 72])])
    hkv = rng.choice([1, 2, 4, 8])
    return dict(dtype=rng.choice(DTYPES), b=rng.choice([1, 1, 2, 3]), s=rng.choice([1, 2, 7, rng.randint(1, 200)]),
                hq=hkv * rng.choice([1, 2, 4]), hkv=hkv, d=d, interleaved=rng.random() < 0.3,
                transposed=rng.random() < 0.7, cos_batch=rng.random() < 0.3, cos_fp32=rng.random() < 0.4)


def cos_sin(b, s, d, dtype, g, per_batch):
    angles = torch.rand(b if per_batch else 1, s, d, generator=g) * 6.28
    return angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()


def check(out, x, cos, sin, interleaved, dtype, what):
    ref = exact(x, cos, sin, interleaved)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)   # PyTorch's baseline: HF's cos/sin in the model dtype
    torch_out = x * cos.unsqueeze(1) + rope.rotate(x, interleaved) * sin.unsqueeze(1)
    err, torch_err = rel_err(out, ref), rel_err(torch_out, ref)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], (what, err, torch_err)


def run_rope(c, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, _ = hf_qkv(c["b"], c["s"], c["hq"], c["hkv"], c["d"], c["dtype"], g, c["transposed"])
    cos, sin = cos_sin(c["b"], c["s"], c["d"], torch.float32 if c["cos_fp32"] else c["dtype"], g, c["cos_batch"])
    qo, ko = poison_(torch.empty(q.shape, dtype=q.dtype, device="cuda")), poison_(
        torch.empty(k.shape, dtype=k.dtype, device="cuda"))
    rope._launch(q, k, None, cos, sin, qo, ko, None, None, c["interleaved"])
    check(qo, q, cos, sin, c["interleaved"], c["dtype"], ("q", c))
    check(ko, k, cos, sin, c["interleaved"], c["dtype"], ("k", c))


def run_cache_write(c, seed, cache_len=300, pos_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    b, s, hkv, d = c["b"], c["s"], c["hkv"], c["d"]
    q, k, v = hf_qkv(b, s, c["hq"], hkv, d, c["dtype"], g, c["transposed"])
    cos, sin = cos_sin(b, s, d, torch.float32 if c["cos_fp32"] else c["dtype"], g, c["cos_batch"])
    start = random.Random(seed).randint(0, cache_len - s)
    pos = torch.arange(start, start + s, dtype=pos_dtype, device="cuda")
    kc = poison_(torch.empty(b, hkv, cache_len, d, dtype=c["dtype"], device="cuda"))
    vc = poison_(torch.empty_like(kc))
    qo = torch.ops.fusedops.rope_cache_write(q, k, v, cos, sin, kc, vc, pos, c["interleaved"])
    check(qo, q, cos, sin, c["interleaved"], c["dtype"], ("q", c))
    check(kc[:, :, start:start + s], k, cos, sin, c["interleaved"], c["dtype"], ("k cache", c))
    assert torch.equal(vc[:, :, start:start + s], v), c
    untouched = torch.ones(cache_len, dtype=torch.bool)
    untouched[start:start + s] = False
    assert kc[:, :, untouched].isnan().all() and vc[:, :, untouched].isnan().all(), c


@pytest.mark.gpu
def test_rope_random_sweep_vs_float64():
    rng = random.Random(5)
    for seed in range(200):
        run_rope(random_case(rng), seed)


@pytest.mark.gpu
def test_rope_cache_write_random_sweep():
    rng = random.Random(6)
    for seed in range(200):
        run_cache_write(random_case(rng), seed, pos_dtype=rng.choice([torch.int32, torch.int64]))


@pytest.mark.gpu
def test_cache_position_is_read_on_device_under_graph_replay():
    g = torch.Generator().manual_seed(0)
    q, k, v = hf_qkv(1, 1, 32, 8, 128, torch.bfloat16, g)
    cos, sin = cos_sin(1, 1, 128, torch.bfloat16, g, False)
    kc = torch.zeros(1, 8, 64, 128, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    pos = torch.tensor([3], device="cuda")
    op = torch.ops.fusedops.rope_cache_write
    op(q, k, v, cos, sin, kc, vc, pos)  # load the kernel outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(q, k, v, cos, sin, kc, vc, pos)
    for p in (10, 42):
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(vc[:, :, p], v[:, :, 0])
    assert kc[:, :, [10, 42]].abs().sum() > 0 and kc[:, :, 11:42].abs().sum() == 0


@pytest.mark.gpu
def test_opcheck_cuda():
    g = torch.Generator().manual_seed(0)
    q, k, v = hf_qkv(2, 5, 8, 2, 64, torch.bfloat16, g)
    cos, sin = cos_sin(2, 5, 64, torch.bfloat16, g, True)
    torch.library.opcheck(torch.ops.fusedops.rope, (q, k, cos, sin))
    kc = torch.zeros(2, 2, 16, 64, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.fusedops.rope_cache_write,
                          (q, k, v, cos, sin, kc, kc.clone(), torch.arange(3, 8, device="cuda")))


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for d, interleaved, cos_fp32 in ((64, False, False), (64, True, True), (6, False, True), (6, True, False)):
            c = dict(dtype=dtype, b=2, s=3, hq=4, hkv=2, d=d, interleaved=interleaved, transposed=True,
                     cos_batch=True, cos_fp32=cos_fp32)
            run_rope(c, 0)
            run_cache_write(c, 0, cache_len=8)
