// RMSNorm forward: y = LlamaRMSNorm(x). Row kernels in rmsnorm.cuh; one CTA per row.
// Variants: c<ITEMS> keep ITEMS 16-byte vectors per thread in registers; sv streams with 16-byte
// vectors; s1 streams element by element (hidden size, row stride or pointer not 16-byte friendly).
#include "common/pdl.cuh"
#include "rmsnorm.cuh"

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

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void rmsnorm_row(const RmsNormParams& p) {
    const int64_t r = blockIdx.x;
    const PlainRow<T, VEC> row{static_cast<const T*>(p.x) + r * p.x_row_stride};
    const T* w = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
    if constexpr (ITEMS > 0)
        rmsnorm_cached<T, VEC, ITEMS>(row, w, out, p.hidden, p.eps);
    else
        rmsnorm_streaming<T, VEC>(row, w, out, p.hidden, p.eps);
}

}  // namespace fusedops

#define FUSEDOPS_RMSNORM_KERNEL(T, NAME, SUFFIX, VEC, ITEMS, MAX_THREADS)                                              \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) rmsnorm_##NAME##_##SUFFIX(const __grid_constant__ RmsNormParams p) { \
        fusedops::pdl::enter();                                                                                                    \
        fusedops::rmsnorm_row<T, VEC, ITEMS>(p);                                                          \
    }
#define FUSEDOPS_RMSNORM_VARIANTS(T, NAME)                                    \
    FUSEDOPS_RMSNORM_KERNEL(T, NAME, c1, fusedops::kVec16<T>, 1, kCachedThreadsC1)              \
    FUSEDOPS_RMSNORM_KERNEL(T, NAME, c2, fusedops::kVec16<T>, 2, kCachedThreads)              \
    FUSEDOPS_RMSNORM_KERNEL(T, NAME, c4, fusedops::kVec16<T>, 4, kCachedThreads)              \
    FUSEDOPS_RMSNORM_KERNEL(T, NAME, sv, fusedops::kVec16<T>, 0, 1024)              \
    FUSEDOPS_RMSNORM_KERNEL(T, NAME, s1, 1, 0, 1024)

FUSEDOPS_RMSNORM_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_RMSNORM_VARIANTS(__half, fp16)
FUSEDOPS_RMSNORM_VARIANTS(float, fp32)
