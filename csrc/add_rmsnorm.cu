// Residual add + RMSNorm in one pass, as the HF decoder layer does it in two:
//   h = round_T(residual + x);  y = LlamaRMSNorm(residual + x), the norm taken of the fp32 sum (as Inductor's
//   fused add + norm does), not of the rounded h.  Writes both y and h. One CTA per row.
// Variants as in rmsnorm.cu: c<ITEMS> (row in registers), sv (streaming, 16-byte), s1 (streaming, scalar).
#include "rmsnorm.cuh"

struct AddRmsNormParams {
    void* y;
    void* h;
    const void* x;
    const void* residual;
    const void* weight;
    int64_t rows;
    int64_t hidden;
    int64_t x_row_stride;         // elements
    int64_t residual_row_stride;  // elements
    int64_t out_row_stride;       // elements, for both y and h
    float eps;
};

namespace fusedops {

template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void add_rmsnorm_row(const AddRmsNormParams& p) {
    const int64_t r = blockIdx.x;
    const ResidualRow<T, VEC> row{static_cast<const T*>(p.x) + r * p.x_row_stride,
                                  static_cast<const T*>(p.residual) + r * p.residual_row_stride,
                                  static_cast<T*>(p.h) + r * p.out_row_stride};
    const T* w = static_cast<const T*>(p.weight);
    T* y = static_cast<T*>(p.y) + r * p.out_row_stride;
    if constexpr (ITEMS > 0)
        rmsnorm_cached<T, VEC, ITEMS>(row, w, y, p.hidden, p.eps);
    else
        rmsnorm_streaming<T, VEC>(row, w, y, p.hidden, p.eps);
}

}  // namespace fusedops

#define FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, SUFFIX, VEC, ITEMS, MAX_THREADS)                                              \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) add_rmsnorm_##NAME##_##SUFFIX(const __grid_constant__ AddRmsNormParams p) { \
        fusedops::add_rmsnorm_row<T, VEC, ITEMS>(p);                                                          \
    }
#define FUSEDOPS_ADD_RMSNORM_VARIANTS(T, NAME)                                \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, c1, fusedops::kVec16<T>, 1, kCachedThreadsC1)          \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, c2, fusedops::kVec16<T>, 2, kCachedThreads)          \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, c4, fusedops::kVec16<T>, 4, kCachedThreads)          \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, sv, fusedops::kVec16<T>, 0, 1024)          \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, NAME, s1, 1, 0, 1024)

FUSEDOPS_ADD_RMSNORM_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_ADD_RMSNORM_VARIANTS(__half, fp16)
FUSEDOPS_ADD_RMSNORM_VARIANTS(float, fp32)
