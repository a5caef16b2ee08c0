// Residual add + RMSNorm in one pass, as the HF decoder layer does it in two:
//   h = round_H(residual + x);  y = LlamaRMSNorm(residual + x), the norm taken of the fp32 sum (as Inductor's
//   fused add + norm does), not of the rounded h.  Writes both y and h. One CTA per row. The residual and h
//   are in the model dtype T, or in fp32 where the rewrite carries the residual stream in fp32.
// Variants as in rmsnorm.cu: c<ITEMS> (row in registers), sv (streaming, 16-byte), s1 (streaming, scalar).
#include "common/pdl.cuh"
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

template <typename T, typename R, typename H, int VEC, int ITEMS>
__device__ __forceinline__ void add_rmsnorm_row(const AddRmsNormParams& p) {
    const int64_t r = blockIdx.x;
    const ResidualRow<T, R, H, VEC> row{static_cast<const T*>(p.x) + r * p.x_row_stride,
                                        static_cast<const R*>(p.residual) + r * p.residual_row_stride,
                                        static_cast<H*>(p.h) + r * p.out_row_stride};
    const T* w = static_cast<const T*>(p.weight);
    T* y = static_cast<T*>(p.y) + r * p.out_row_stride;
    if constexpr (ITEMS > 0)
        rmsnorm_cached<T, VEC, ITEMS>(row, w, y, p.hidden, p.eps);
    else
        rmsnorm_streaming<T, VEC>(row, w, y, p.hidden, p.eps);
}

}  // namespace fusedops

// Names: add_rmsnorm_<dtype>_<variant><io>, io "" (residual and h in T), "_h32" (h in fp32), "_r32" (residual in
// fp32), "_r32h32" (both): the fp32 residual stream (fusedops/ops/add_rmsnorm.py picks by the tensors' dtypes).
#define FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, SUFFIX, IO, VEC, ITEMS, MAX_THREADS)                       \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                                 \
        add_rmsnorm_##NAME##_##SUFFIX##IO(const __grid_constant__ AddRmsNormParams p) {                       \
        fusedops::pdl::enter();                                                                               \
        fusedops::add_rmsnorm_row<T, R, H, VEC, ITEMS>(p);                                                    \
    }
#define FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(T, R, H, NAME, IO)                                                   \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, c1, IO, fusedops::kVec16<T>, 1, kCachedThreadsC1)              \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, c2, IO, fusedops::kVec16<T>, 2, kCachedThreads)                \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, c4, IO, fusedops::kVec16<T>, 4, kCachedThreads)                \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, sv, IO, fusedops::kVec16<T>, 0, 1024)                          \
    FUSEDOPS_ADD_RMSNORM_KERNEL(T, R, H, NAME, s1, IO, 1, 0, 1024)
#define FUSEDOPS_ADD_RMSNORM_VARIANTS(T, NAME)                       \
    FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(T, T, T, NAME, )                \
    FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(T, T, float, NAME, _h32)        \
    FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(T, float, T, NAME, _r32)        \
    FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(T, float, float, NAME, _r32h32)

FUSEDOPS_ADD_RMSNORM_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_ADD_RMSNORM_VARIANTS(__half, fp16)
FUSEDOPS_ADD_RMSNORM_VARIANTS_IO(float, float, float, fp32, )
