// Softmax over the last dim, fp32 statistics, one rounding at the end (as torch.softmax does for
// 16-bit inputs): y = T( exp(x - max) / sum(exp(x - max)) ).
// Variants by row length:
//   w<ITEMS>  one warp per row, row in registers, shuffle-only reductions (short rows: 4 rows a CTA)
//   c<ITEMS>  one CTA per row, row in registers (max, then sum, from the same registers)
//   o / o1    one CTA per row, online: one pass keeps a running (max, sum) per thread, merged across
//             the CTA; a second pass writes (rows too long for registers; o1 = element by element)
#include "common/pdl.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"

struct SoftmaxParams {
    void* out;
    const void* x;
    int64_t rows;
    int64_t cols;
    int64_t x_row_stride;    // elements
    int64_t out_row_stride;  // elements
};

constexpr int kWarpRowsPerCta = 4;    // w-variants: 128 threads, 4 rows
constexpr int kCachedThreads = 512;   // c-variants: at most 512 threads (128 registers a thread for c8)
constexpr float kLog2e = 1.4426950408889634f;

namespace fusedops {

template <typename T, int VEC>
__device__ __forceinline__ void load_row_part(const T* x, int idx, int nvec, float (&f)[VEC], float& mx) {
    if (idx < nvec) {
        const Vec<T, VEC> v = load_vec<T, VEC>(x + idx * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            f[j] = to_float(v.v[j]);
            mx = fmaxf(mx, f[j]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = -INFINITY;
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_scaled(T* out, int idx, const float (&e)[VEC], float inv) {
    Vec<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(e[j] * inv);
    store_vec<T, VEC>(out + idx * VEC, y);
}

// Row held in registers by `lanes` threads (a warp, or the CTA). WARP: reductions stay in the warp.
template <typename T, int VEC, int ITEMS, bool WARP>
__device__ __forceinline__ void softmax_cached(const T* x, T* out, int64_t cols, int lane, int lanes) {
    __shared__ float scratch[32];
    const int nvec = static_cast<int>(cols / VEC);
    float f[ITEMS][VEC];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) load_row_part<T, VEC>(x, lane + i * lanes, nvec, f[i], mx);
    mx = WARP ? warp_max(mx) : block_max(mx, scratch);
    float sum = 0.f;
    const float mx2 = mx * kLog2e;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            f[i][j] = exp2f(fmaf(f[i][j], kLog2e, -mx2));  // -inf padding gives 0
            sum += f[i][j];
        }
    sum = WARP ? warp_sum(sum) : block_sum(sum, scratch);
    const float inv = 1.f / sum;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
        if (lane + i * lanes < nvec) store_scaled<T, VEC>(out, lane + i * lanes, f[i], inv);
}

// Merge two (max, sum of exp(x - max)) pairs; an empty pair is (-inf, 0).
__device__ __forceinline__ void merge_online(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = s * exp2f((m - mn) * kLog2e) + s2 * exp2f((m2 - mn) * kLog2e);
    m = mn;
}

template <typename T, int VEC>
__device__ __forceinline__ void softmax_online(const T* x, T* out, int64_t cols) {
    __shared__ float sm[32], ss[32];
    const int64_t nvec = cols / VEC;
    float m = -INFINITY, s = 0.f;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        const Vec<T, VEC> v = load_vec<T, VEC>(x + idx * VEC);
        float vmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < VEC; ++j) vmax = fmaxf(vmax, to_float(v.v[j]));
        float vs = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) vs += exp2f((to_float(v.v[j]) - vmax) * kLog2e);
        merge_online(m, s, vmax, vs);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        merge_online(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.f;
    for (int w = 0; w < nwarps; ++w) merge_online(m, s, sm[w], ss[w]);
    const float inv = 1.f / s;
    for (int64_t idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        const Vec<T, VEC> v = load_vec<T, VEC>(x + idx * VEC);
        Vec<T, VEC> y;
#pragma unroll
        for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(exp2f((to_float(v.v[j]) - m) * kLog2e) * inv);
        store_vec<T, VEC>(out + idx * VEC, y);
    }
}

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void softmax_warp_rows(const SoftmaxParams& p) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerCta + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    softmax_cached<T, VEC, ITEMS, true>(static_cast<const T*>(p.x) + row * p.x_row_stride,
                                        static_cast<T*>(p.out) + row * p.out_row_stride, p.cols, threadIdx.x & 31, 32);
}

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void softmax_block_row(const SoftmaxParams& p) {
    const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.x_row_stride;
    T* out = static_cast<T*>(p.out) + blockIdx.x * p.out_row_stride;
    if constexpr (ITEMS > 0)
        softmax_cached<T, VEC, ITEMS, false>(x, out, p.cols, threadIdx.x, blockDim.x);
    else
        softmax_online<T, VEC>(x, out, p.cols);
}

}  // namespace fusedops

#define FUSEDOPS_SOFTMAX_KERNEL(T, NAME, SUFFIX, BODY, VEC, ITEMS, MAX_THREADS)                             \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) softmax_##NAME##_##SUFFIX(const __grid_constant__ SoftmaxParams p) { \
        fusedops::pdl::enter();                                                                                                    \
        fusedops::BODY<T, VEC, ITEMS>(p);                                                                   \
    }
#define FUSEDOPS_SOFTMAX_VARIANTS(T, NAME)                                                          \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, w1, softmax_warp_rows, fusedops::kVec16<T>, 1, 32 * kWarpRowsPerCta) \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, w2, softmax_warp_rows, fusedops::kVec16<T>, 2, 32 * kWarpRowsPerCta) \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, w4, softmax_warp_rows, fusedops::kVec16<T>, 4, 32 * kWarpRowsPerCta) \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, c1, softmax_block_row, fusedops::kVec16<T>, 1, kCachedThreads)      \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, c2, softmax_block_row, fusedops::kVec16<T>, 2, kCachedThreads)      \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, c4, softmax_block_row, fusedops::kVec16<T>, 4, kCachedThreads)      \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, c8, softmax_block_row, fusedops::kVec16<T>, 8, kCachedThreads)      \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, o, softmax_block_row, fusedops::kVec16<T>, 0, 1024)                 \
    FUSEDOPS_SOFTMAX_KERNEL(T, NAME, o1, softmax_block_row, 1, 0, 1024)

FUSEDOPS_SOFTMAX_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_SOFTMAX_VARIANTS(__half, fp16)
FUSEDOPS_SOFTMAX_VARIANTS(float, fp32)
