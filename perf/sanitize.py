"""Small-case driver for compute-sanitizer (memcheck, racecheck): runs every fusedops CUDA op once on
small, odd-sized random inputs. Run as `compute-sanitizer --tool memcheck python3 perf/sanitize.py`."""
import torch

import fusedops  # noqa: F401

F = torch.ops.fusedops
dev, bf = "cuda", torch.bfloat16


def r(*shape, dtype=bf):
    return torch.randn(*shape, device=dev, dtype=dtype)


def cases():
    b, hq, hkv, s, d, l = 2, 8, 2, 37, 64, 80
    q, k, v = r(b, hq, s, d), r(b, hkv, s, d), r(b, hkv, s, d)
    cos, sin = r(b, s, d), r(b, s, d)
    kc, vc = r(b, hkv, l, d), r(b, hkv, l, d)
    pos = torch.arange(5, 5 + s, device=dev)
    yield "rms_norm", lambda: F.rms_norm(r(5, 4100), r(4100), 1e-6)
    yield "rms_norm odd", lambda: F.rms_norm(r(3, 77), r(77), 1e-6)
    yield "add_rms_norm", lambda: F.add_rms_norm(r(5, 4096), r(5, 4096), r(4096), 1e-6)
    yield "add_rms_norm fp32 stream", lambda: F.add_rms_norm(r(5, 4096), r(5, 4096, dtype=torch.float32), r(4096),
                                                             1e-6, True)
    yield "add_rms_norm fp32 stream odd", lambda: F.add_rms_norm(r(3, 77), r(3, 77, dtype=torch.float32), r(77),
                                                                 1e-6, True)
    yield "rope", lambda: F.rope(q, k, cos, sin)
    yield "rope_cache_write", lambda: F.rope_cache_write(q, k, v, cos, sin, kc, vc, pos)
    yield "silu_mul", lambda: F.silu_mul(r(3, 1001), r(3, 1001))
    yield "silu_mul_cat", lambda: F.silu_mul_cat(r(3, 2002))
    yield "attention prefill", lambda: F.attention(q, k, v, None, None, True, None)
    yield "attention cache", lambda: F.attention(r(b, hq, 3, d), kc, vc, None, None, True,
                                                 torch.tensor([40, 80], device=dev, dtype=torch.int32))
    yield "linear", lambda: F.linear(r(7, 256), r(384, 256), None)
    # decode-size GEMV (M <= 16): odd N, all three epilogues
    yield "gemv linear", lambda: F.linear(r(3, 264), r(100, 264), r(100))
    yield "gemv residual", lambda: F.linear_residual(r(5, 136), r(77, 136), r(5, 77))
    yield "gemv swiglu", lambda: F.gate_up_silu(r(2, 256), r(2 * 96, 256), 96)
    # int4 GEMV and its dequantize + GEMM route
    from fusedops import quant
    qw = quant.quantize(r(96, 256))
    for m in (1, 5, 20):
        yield f"linear_w4 M={m}", lambda m=m: F.linear_w4(r(m, 256), qw.qweight, qw.scales, qw.zeros, qw.group)
    qgu = quant.quantize(r(2 * 64, 256))
    yield "gate_up_silu_w4", lambda: F.gate_up_silu_w4(r(3, 256), qgu.qweight, qgu.scales, qgu.zeros, qgu.group)
    yield "linear_residual_w4", lambda: F.linear_residual_w4(r(2, 256), qw.qweight, qw.scales, qw.zeros,
                                                             qw.group, r(2, 96))
    # boolean-mask prefill: the block map, then the kernel skipping / unmasked / mixed tiles
    mask = torch.rand(b, 1, s, l, device=dev) > 0.3
    mask[..., :s, :] &= torch.ones(s, l, device=dev, dtype=torch.bool).tril(5)
    blocks = F.attention_mask_blocks(mask)
    yield "attention_mask_blocks", lambda: F.attention_mask_blocks(mask)
    yield "attention masked", lambda: F.attention(q, kc, vc, mask, None, False, None, blocks)
    for name in ("softmax", "layer_norm", "transpose"):
        if hasattr(F, name):
            yield name, {"softmax": lambda: F.softmax(r(5, 1000)),
                         "layer_norm": lambda: F.layer_norm(r(5, 1000), r(1000), r(1000), 1e-5),
                         "transpose": lambda: F.transpose(r(3, 65, 130))}[name]


def main():
    ran, skipped = [], []
    for name, fn in cases():
        try:
            fn()
            torch.cuda.synchronize()
            ran.append(name)
        except NotImplementedError as exc:  # the op has no CUDA kernel (yet): say so, do not hide errors
            skipped.append(f"{name} ({str(exc).splitlines()[0][:80]})")
    print("sanitized:", ", ".join(ran))
    if skipped:
        print("not run:", "; ".join(skipped))


if __name__ == "__main__":
    main()
