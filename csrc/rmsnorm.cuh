// RMSNorm row kernels shared by rmsnorm.cu and add_rmsnorm.cu: Hugging Face LlamaRMSNorm computed in fp32
// and rounded once, y = T( float(w) * h * rsqrt(mean(h^2) + eps) ) (eager rounds before the weight too;
// one rounding, as Inductor fuses it, sits closer to the fp32 model).
// One CTA per row. A "Row" policy says where h comes from: straight from x (PlainRow), or
// h = x + residual, summed in fp32 for the norm and written out rounded as it is formed (ResidualRow).
// The "cached" form keeps the row in registers (one HBM read); the "streaming" form re-reads it
// for the second pass (rows too long for registers, or VEC = 1 when 16-byte vectors are ruled out).
#pragma once
#include "common/reduce.cuh"
#include "common/vec.cuh"

// Most threads a cached-variant CTA has (CACHED_THREADS in fusedops/ops/rmsnorm.py): the bound leaves
// 128 registers a thread. A c8 variant (8 row + 8 weight vectors) spilled 24 bytes even there, so rows
// longer than 4 x 512 vectors stream (sv) instead.
constexpr int kCachedThreads = 512;
// c1 (one vector a thread, ~30 registers) may use 1024 threads: a whole [.., 8192] bf16 row then sits in
// registers at full occupancy (c2 at 512 threads: 48 registers, 2 CTAs an SM, 79 % of copy on the H100).
constexpr int kCachedThreadsC1 = 1024;

namespace fusedops {

template <typename T, int VEC>
struct PlainRow {
    using Value = Vec<T, VEC>;
    const T* x;
    __device__ __forceinline__ Value first(int64_t i) const { return load_vec<T, VEC>(x + i * VEC); }
    __device__ __forceinline__ Value again(int64_t i) const { return first(i); }
};

// h = x + residual, kept in fp32 for the norm and written out rounded once to H. The norm of the unrounded sum
// is what Inductor computes when it fuses the add into the norm; eager's norm of the rounded h adds one bf16
// rounding of the whole residual stream to every layer's norm input. R and H may be float while T is 16-bit:
// the residual stream carried in fp32 between the fused adds (fusedops/backend/patterns/residual.py).
template <typename T, typename R, typename H, int VEC>
struct ResidualRow {
    using Value = Vec<float, VEC>;
    const T* x;
    const R* residual;
    H* h;
    __device__ __forceinline__ Value sum(int64_t i) const {
        const Vec<T, VEC> a = load_vec<T, VEC>(x + i * VEC);
        const Vec<R, VEC> b = load_vec<R, VEC>(residual + i * VEC);
        Value s;
#pragma unroll
        for (int j = 0; j < VEC; ++j) s.v[j] = to_float(b.v[j]) + to_float(a.v[j]);
        return s;
    }
    __device__ __forceinline__ Value first(int64_t i) const {
        const Value s = sum(i);
        Vec<H, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<H>(s.v[j]);
        store_vec<H, VEC>(h + i * VEC, out);
        return s;
    }
    // Streaming second pass: the sum again from x and residual (L2-resident), not from the rounded h.
    __device__ __forceinline__ Value again(int64_t i) const { return sum(i); }
};

template <typename E, int VEC>
__device__ __forceinline__ float sum_squares(const Vec<E, VEC>& v) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float f = to_float(v.v[j]);
        ss += f * f;
    }
    return ss;
}

template <typename T, int VEC, typename E>
__device__ __forceinline__ void scale_store(T* out, const Vec<T, VEC>& wv, int64_t i, const Vec<E, VEC>& hv, float rstd) {
    Vec<T, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
        yv.v[j] = from_float<T>(to_float(wv.v[j]) * (to_float(hv.v[j]) * rstd));
    store_vec<T, VEC>(out + i * VEC, yv);
}

// ITEMS vectors of VEC elements per thread, all held in registers. The weight is loaded together
// with the row, before the reduction: loading it after would put a second DRAM round trip on every
// row's critical path (decode rows measured 3.1 us vs Inductor's 1.8 us under graph replay that way).
template <typename T, int VEC, int ITEMS, typename Row>
__device__ __forceinline__ void rmsnorm_cached(const Row& row, const T* w, T* out, int64_t hidden, float eps) {
    __shared__ float scratch[32];
    const int nvec = static_cast<int>(hidden / VEC);
    typename Row::Value hv[ITEMS];
    Vec<T, VEC> wv[ITEMS];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * blockDim.x;
        if (idx < nvec) {
            wv[i] = load_vec<T, VEC>(w + idx * VEC);
            hv[i] = row.first(idx);
            ss += sum_squares(hv[i]);
        }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * blockDim.x;
        if (idx < nvec) scale_store<T, VEC>(out, wv[i], idx, hv[i], rstd);
    }
}

// Any hidden size: two passes over the row, the second served from L1/L2.
template <typename T, int VEC, typename Row>
__device__ __forceinline__ void rmsnorm_streaming(const Row& row, const T* w, T* out, int64_t hidden, float eps) {
    __shared__ float scratch[32];
    const int64_t nvec = hidden / VEC;
    float ss = 0.f;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) ss += sum_squares(row.first(idx));
    const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(hidden) + eps);
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x)
        scale_store<T, VEC>(out, load_vec<T, VEC>(w + idx * VEC), idx, row.again(idx), rstd);
}

}  // namespace fusedops
