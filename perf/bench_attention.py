"""Prefill attention: fusedops kernel (each PREFILL_TILES variant) vs SDPA's FLASH (FA2) and cuDNN
backends, GQA 32 q heads / 8 kv heads, B*S = 16k tokens, TFLOP/s counting causal as half, and the
bf16 GEMM peak measured in the same run.

    python3 perf/bench_attention.py [--quick]     # table, also written to perf/out/bench_attention.md
    python3 perf/bench_attention.py --hf-mask     # HF's StaticCache mask vs is_causal vs SDPA, S=512/2048
    python3 perf/bench_attention.py --sanitize    # a few small cases, for compute-sanitizer
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from common import gemm_tflops, table, time_cuda, time_graph
from fusedops.ops import attention as A

TOKENS, HQ, HKV = 16384, 32, 8
SHAPES = [(1024, 128, True), (2048, 128, True), (4096, 128, True), (8192, 128, True),
          (8192, 128, False), (2048, 128, False), (4096, 64, True), (4096, 64, False)]


def label(tile):
    return ",".join(map(str, tile))


def sdpa_backend(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    try:
        run()
    except RuntimeError:
        return None
    return run


def bench(quick: bool):
    peak = gemm_tflops()
    rows = []
    for s, d, causal in SHAPES[:3] if quick else SHAPES:
        b = TOKENS // s
        q = torch.randn(b, HQ, s, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, HKV, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * b * HQ * s * s * d / (2 if causal else 1)
        tflops = lambda fn: flops / time_cuda(fn, reps=20) / 1e6 if fn else float("nan")  # noqa: E731
        ours = {t: tflops(lambda t=t: A.attention_prefill_cuda(q, k, v, None, None, causal, None, tile=t))
                for t in A.PREFILL_TILES[d]}
        best = max(ours, key=ours.get)
        flash = tflops(sdpa_backend(SDPBackend.FLASH_ATTENTION, q, k, v, causal))
        cudnn = tflops(sdpa_backend(SDPBackend.CUDNN_ATTENTION, q, k, v, causal))
        row = {"S": s, "D": d, "causal": "yes" if causal else "no", "fusedops TF/s": ours[best],
               "tile (m,n,warps,min_blocks)": label(best),
               "FLASH TF/s": flash, "cuDNN TF/s": cudnn, "vs FLASH": ours[best] / flash,
               "vs cuDNN": ours[best] / cudnn, "% GEMM peak": 100 * ours[best] / peak,
               "other tiles": " ".join(f"{label(t)}:{v:.0f}" for t, v in ours.items() if t != best)}
        rows.append(row)
        print(row, flush=True)
    table(rows, f"prefill attention, bf16, Hq={HQ} Hkv={HKV}, B*S={TOKENS}; bf16 GEMM peak {peak:.0f} TFLOP/s",
          "bench_attention.md")


def static_cache_mask(s: int, cache_len: int) -> torch.Tensor:
    """HF's StaticCache prefill mask at cache_position 0..s-1, B=1: key j visible to query i iff
    j <= i (causal at the cache position, which also keeps it inside the written part)."""
    keys, queries = torch.arange(cache_len, device="cuda"), torch.arange(s, device="cuda")
    return (keys[None, None, None, :] <= queries[None, None, :, None])


def hf_mask(shapes=((512, 576), (512, 4096), (2048, 2112), (2048, 4096))):
    """One prefill layer's attention as the e2e benchmark runs it: B=1, S new tokens at the start of a
    StaticCache of cache_len positions, HF's boolean mask [1, 1, S, cache_len]. fusedops with the
    mask (block map precomputed, as the backend does once per forward; and computed in the call) vs
    fusedops is_causal over the S written keys vs SDPA. GPU µs per call under CUDA-graph replay (SDPA
    MATH: events, it is slow); rel err of the masked fusedops output vs the fp32 reference."""
    rows = []
    for s, cache_len in shapes:
        q = torch.randn(1, HQ, s, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, HKV, cache_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k_rep, v_rep = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))  # HF's repeat_kv for SDPA
        mask = static_cache_mask(s, cache_len)
        blocks = A.mask_blocks_cuda(mask)
        kv_len = torch.tensor([s], device="cuda", dtype=torch.int32)
        k_s, v_s = k[:, :, :s], v[:, :, :s]

        def sdpa_with(backend, *args, **kwargs):
            with sdpa_kernel(backend):
                return sdpa(*args, **kwargs)
        cases = {
            "fusedops mask + map + kv_len (backend)": lambda: A.attention_prefill_cuda(
                q, k, v, mask, None, False, kv_len, mask_blocks=blocks),
            "fusedops mask + map": lambda: A.attention_prefill_cuda(q, k, v, mask, None, False, None,
                                                                    mask_blocks=blocks),
            "fusedops mask (map in the call)": lambda: A.attention_prefill_cuda(q, k, v, mask, None, False, None),
            "block map alone": lambda: A.mask_blocks_cuda(mask),
            "fusedops is_causal, S keys": lambda: A.attention_prefill_cuda(q, k_s, v_s, None, None, True, None),
            "SDPA FLASH is_causal, S keys, gqa": lambda: sdpa_with(SDPBackend.FLASH_ATTENTION, q, k_s, v_s,
                                                                  is_causal=True, enable_gqa=True),
            "SDPA default, mask, repeat_kv (HF)": lambda: sdpa(q, k_rep, v_rep, attn_mask=mask),
            "SDPA EFFICIENT, mask, repeat_kv": lambda: sdpa_with(SDPBackend.EFFICIENT_ATTENTION, q, k_rep, v_rep,
                                                                attn_mask=mask),
        }
        times = {name: time_graph(fn, calls=10, reps=10) for name, fn in cases.items()}
        times["SDPA MATH, mask, repeat_kv"] = time_cuda(
            lambda: sdpa_with(SDPBackend.MATH, q, k_rep, v_rep, attn_mask=mask), warmup=1, reps=5)
        out = cases["fusedops mask + map + kv_len (backend)"]().float()
        ref = A.attention_reference(q.float(), k.float(), v.float(), mask)
        err = float((out - ref).norm() / ref.norm())
        del out, ref
        causal = times["fusedops is_causal, S keys"]
        for name, us in times.items():
            rows.append({"S": s, "cache len": cache_len, "case": name, "µs": us, "× fusedops causal": us / causal,
                         "rel err vs fp32": f"{err:.1e}" if name.startswith("fusedops mask + map + kv_len") else ""})
        print(rows[-len(times):], flush=True)
    table(rows, f"one prefill layer's attention with HF's StaticCache mask, B=1 Hq={HQ} Hkv={HKV} D=128, bf16",
          "bench_attention_hf_mask.md")


def sanitize():
    """Small odd-sized cases through every tile variant: masks, kv_len, varlen, strided views."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    for d, tiles in A.PREFILL_TILES.items():
        for tile in tiles:
            q, k, v = r(2, 37, 4, d).transpose(1, 2), r(2, 2, 70, d), r(2, 2, 70, d)
            mask = (torch.rand(2, 1, 37, 70, generator=g) > 0.3).cuda()
            kv_len = torch.tensor([50, 70], device="cuda", dtype=torch.int32)
            lse = torch.empty(2, 4, 37, device="cuda")
            A.attention_prefill_cuda(q, k, v, mask, None, True, kv_len, lse=lse, tile=tile)
            A.attention_prefill_cuda(q, k, v, None, None, False, None, tile=tile)
            cu_q = torch.tensor([0, 5, 42], device="cuda", dtype=torch.int32)
            cu_k = torch.tensor([0, 9, 79], device="cuda", dtype=torch.int32)
            A.attention_varlen_cuda(r(42, 4, d), r(79, 2, d), r(79, 2, d), cu_q, cu_k, 37, 70, None, True, tile=tile)
    torch.cuda.synchronize()
    print("sanitize cases ran")


if __name__ == "__main__":
    if "--sanitize" in sys.argv:
        sanitize()
    elif "--hf-mask" in sys.argv:
        hf_mask()
    else:
        bench("--quick" in sys.argv)
