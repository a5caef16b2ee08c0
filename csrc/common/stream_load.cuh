// 16-byte global loads of the decode GEMVs (csrc/gemv.cu, csrc/gemv_w4.cu). Volatile asm: NVVM keeps their
// order relative to the mmas, which is how a GEMV step issues all its loads before its first mma.
#pragma once
#include <stdint.h>

namespace fusedops {

// A weight is read exactly once: kept out of L1, with a 256-byte L2 prefetch (the next step's bytes).
__device__ __forceinline__ uint4 load_weight(const void* ptr) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// x is reused by every warp of every CTA: cached.
__device__ __forceinline__ uint4 load_x(const void* ptr) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
    return v;
}

}  // namespace fusedops
