"""RoPE bf16 on Llama-3-8B q/k (32 q heads, 8 kv heads, D = 128): fusedops vs eager, Inductor and Liger
at 8k tokens (HF's transposed q/k views and contiguous ones); and RoPE + static KV-cache write in one
kernel vs Inductor RoPE + index_copy_ at decode and prefill sizes. GPU times from CUDA-graph replay
for all (see bench_rmsnorm.py). Run: PYTHONPATH=.:perf python3 perf/bench_rope.py"""
import functools

import torch

from common import copy_bandwidth_gbs, inductor, liger_module, table, time_cuda, time_graph, versus
from fusedops.ops import rope

HQ, HKV, D = 32, 8, 128
CACHE_LEN = 8192
big = functools.partial(time_graph, calls=10, reps=10)


def qkv(b, s, transposed=True):
    def one(h):
        if transposed:
            return torch.randn(b, s, h * D, device="cuda", dtype=torch.bfloat16).view(b, s, h, D).transpose(1, 2)
        return torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16)
    return one(HQ), one(HKV), one(HKV)


def cos_sin(s):
    angles = torch.rand(1, s, D, device="cuda") * 6.28
    return angles.cos().bfloat16(), angles.sin().bfloat16()


def rope_then_cache(q, k, v, cos, sin, k_cache, v_cache, pos):
    """HF's order: apply_rotary_pos_emb, then StaticLayer.update's index_copy_ into both caches."""
    qo, ko = rope.rope_reference(q, k, cos, sin)
    k_cache.index_copy_(2, pos, ko)
    v_cache.index_copy_(2, pos, v)
    return qo


def main():
    copy = copy_bandwidth_gbs()
    liger = liger_module("ops.rope")
    compiled = inductor(rope.rope_reference)
    compiled_cache = inductor(rope_then_cache)
    rows_out = []
    for transposed in (True, False):
        q, k, _ = qkv(1, 8192, transposed)
        cos, sin = cos_sin(8192)
        nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
        rows_out.append(versus(f"rope 8k tokens, {'HF transposed' if transposed else 'contiguous'} q/k", nbytes, {
            "fusedops": big(lambda: torch.ops.fusedops.rope(q, k, cos, sin)),
            "eager": big(lambda: rope.rope_reference(q, k, cos, sin)),
            "inductor": big(lambda: compiled(q, k, cos, sin)),
            "liger": big(lambda: liger.LigerRopeFunction.apply(q, k, cos, sin)) if liger else None}, copy))
        rows_out[-1]["fusedops eager µs"] = time_cuda(lambda: torch.ops.fusedops.rope(q, k, cos, sin))
    for b, s, timer in ((1, 1, time_graph), (8, 1, time_graph), (1, 2048, big), (1, 8192, big)):
        q, k, v = qkv(b, s)
        cos, sin = cos_sin(s)
        kc = torch.zeros(b, HKV, CACHE_LEN, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        pos = torch.arange(CACHE_LEN - s, CACHE_LEN, device="cuda")
        nbytes = 2 * (q.numel() + 2 * k.numel()) * 2 + 2 * cos.numel() * 2
        label = f"rope+cache write B={b} S={s}" + (", graph" if timer is time_graph else "")
        rows_out.append(versus(label, nbytes, {
            "fusedops": timer(lambda: torch.ops.fusedops.rope_cache_write(q, k, v, cos, sin, kc, vc, pos)),
            "eager": timer(lambda: rope_then_cache(q, k, v, cos, sin, kc, vc, pos)),
            "inductor": timer(lambda: compiled_cache(q, k, v, cos, sin, kc, vc, pos))}, copy))
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(rows_out, "RoPE bf16, Llama-3-8B heads (µs; x = speed-up of fusedops)", "rope.md")


if __name__ == "__main__":
    main()
