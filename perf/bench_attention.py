"""Prefill attention: fusedops kernel (each PREFILL_TILES variant) vs SDPA's FLASH (FA2) and cuDNN
backends, GQA 32 q heads / 8 kv heads, B*S = 16k tokens, TFLOP/s counting causal as half, and the
bf16 GEMM peak measured in the same run.

    python3 perf/bench_attention.py [--quick]     # table, also written to perf/out/bench_attention.md
    python3 perf/bench_attention.py --sanitize    # a few small cases, for compute-sanitizer
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from common import gemm_tflops, table, time_cuda
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


def hf_mask(s: int = 2048):
    """What one prefill layer of the e2e benchmark runs: B=1, S new tokens into a StaticCache of S, HF's
    boolean causal mask. fusedops given the mask alone (what the backend passes today) vs with
    is_causal (tiles above the diagonal skipped) vs SDPA with the same mask, µs per call."""
    q = torch.randn(1, HQ, s, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, HKV, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(s, s, device="cuda", dtype=torch.bool).tril()[None, None]
    kv_len = torch.tensor([s], device="cuda", dtype=torch.int32)
    cases = {
        "fusedops, mask only": lambda: A.attention_prefill_cuda(q, k, v, mask, None, False, None),
        "fusedops, mask + is_causal + kv_len": lambda: A.attention_prefill_cuda(q, k, v, mask, None, True, kv_len),
        "fusedops, is_causal only": lambda: A.attention_prefill_cuda(q, k, v, None, None, True, None),
        "SDPA (default backend), mask, enable_gqa": lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
        "SDPA (default backend), is_causal, enable_gqa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
    }
    table([{"case": name, "µs": time_cuda(fn, reps=20)} for name, fn in cases.items()],
          f"one prefill layer's attention, S={s}, HF causal bool mask", "bench_attention_hf_mask.md")


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
