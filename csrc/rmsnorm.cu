// RMSNorm forward with Hugging Face LlamaRMSNorm rounding:
//   y = T( float(w) * round_T( x * rsqrt(mean(x^2) + eps) ) ), statistics in fp32.
// One CTA per row. The "cached" variants keep the row in registers (one read of x from HBM);
// the "streaming" variants re-read x for the second pass (rows too long for registers, or a
// hidden size / pointer alignment that rules out 16-byte vectors: then VEC = 1).
#include "common/reduce.cuh"
#include "common/vec.cuh"

struct RmsNormParams {
    void* out;
    const void* x;
    const void* weight;
    int64_t rows;
    int64_t hidden;
    int64_t x_row_stride;    // elements
    int64_t out_row_stride;  // elements
    float eps;
};

namespace fusedops {

// ITEMS vectors of VEC elements per thread, all held in registers.
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void rmsnorm_cached(const RmsNormParams& p) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* w = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out) + row * p.out_row_stride;
    const int nvec = static_cast<int>(p.hidden / VEC);

    Vec<T, VEC> xv[ITEMS];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * blockDim.x;
        if (idx < nvec) {
            xv[i] = load_vec<T, VEC>(x + idx * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float f = to_float(xv[i].v[j]);
                ss += f * f;
            }
        }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int idx = threadIdx.x + i * blockDim.x;
        if (idx < nvec) {
            const Vec<T, VEC> wv = load_vec<T, VEC>(w + idx * VEC);
            Vec<T, VEC> yv;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                yv.v[j] = from_float<T>(to_float(wv.v[j]) * round_to<T>(to_float(xv[i].v[j]) * rstd));
            store_vec<T, VEC>(out + idx * VEC, yv);
        }
    }
}

// Any hidden size: two passes over the row, the second served from L1/L2.
template <typename T, int VEC>
__device__ __forceinline__ void rmsnorm_streaming(const RmsNormParams& p) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* w = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out) + row * p.out_row_stride;
    const int64_t nvec = p.hidden / VEC;

    float ss = 0.f;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + idx * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float f = to_float(xv.v[j]);
            ss += f * f;
        }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / static_cast<float>(p.hidden) + p.eps);
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + idx * VEC);
        const Vec<T, VEC> wv = load_vec<T, VEC>(w + idx * VEC);
        Vec<T, VEC> yv;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            yv.v[j] = from_float<T>(to_float(wv.v[j]) * round_to<T>(to_float(xv.v[j]) * rstd));
        store_vec<T, VEC>(out + idx * VEC, yv);
    }
}

}  // namespace fusedops

#define FUSEDOPS_RMSNORM_VARIANTS(T, NAME)                                                         \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_##NAME##_c1(const __grid_constant__ RmsNormParams p) { \
        fusedops::rmsnorm_cached<T, fusedops::kVec16<T>, 1>(p);                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_##NAME##_c2(const __grid_constant__ RmsNormParams p) { \
        fusedops::rmsnorm_cached<T, fusedops::kVec16<T>, 2>(p);                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_##NAME##_c4(const __grid_constant__ RmsNormParams p) { \
        fusedops::rmsnorm_cached<T, fusedops::kVec16<T>, 4>(p);                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_##NAME##_sv(const __grid_constant__ RmsNormParams p) { \
        fusedops::rmsnorm_streaming<T, fusedops::kVec16<T>>(p);                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) rmsnorm_##NAME##_s1(const __grid_constant__ RmsNormParams p) { \
        fusedops::rmsnorm_streaming<T, 1>(p);                                                      \
    }

FUSEDOPS_RMSNORM_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_RMSNORM_VARIANTS(__half, fp16)
FUSEDOPS_RMSNORM_VARIANTS(float, fp32)
