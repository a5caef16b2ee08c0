// SwiGLU activation: out = T( silu(g) * u ) in fp32, rounded once (eager rounds silu(g) first).
// 2-D launch: blockIdx.y walks rows (grid-stride past 65535), x-threads walk VEC-element vectors of a
// row; the last vector of a row that does not fill VEC elements goes element by element.
// silu_mul passes g and u as one long row; silu_mul_cat passes rows of [g | u] with u = g + I.
#include "common/pdl.cuh"
#include "common/vec.cuh"

struct SiluMulParams {
    void* out;
    const void* g;
    const void* u;
    int64_t rows;
    int64_t cols;
    int64_t g_row_stride;    // elements
    int64_t u_row_stride;
    int64_t out_row_stride;
};

namespace fusedops {

// __fdividef (rcp.approx + mul, 2 ulp) instead of an IEEE division: the division's slow-path
// subroutine sat on every thread's critical path, and a decode-size call is one vector a thread.
// For x < -87 the denominator passes 2^126 and __fdividef gives 0 where silu(x) is ~1e-36.
template <typename T>
__device__ __forceinline__ T silu_mul_one(T g, T u) {
    const float x = to_float(g);
    return from_float<T>(__fdividef(x, 1.f + __expf(-x)) * to_float(u));
}

template <typename T, int VEC>
__device__ __forceinline__ void silu_mul_rows(const SiluMulParams& p) {
    const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t col = v * VEC;
    if (col >= p.cols) return;
    for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
        const T* g = static_cast<const T*>(p.g) + r * p.g_row_stride + col;
        const T* u = static_cast<const T*>(p.u) + r * p.u_row_stride + col;
        T* out = static_cast<T*>(p.out) + r * p.out_row_stride + col;
        if (col + VEC <= p.cols) {
            const Vec<T, VEC> gv = load_vec<T, VEC>(g), uv = load_vec<T, VEC>(u);
            Vec<T, VEC> ov;
#pragma unroll
            for (int j = 0; j < VEC; ++j) ov.v[j] = silu_mul_one(gv.v[j], uv.v[j]);
            store_vec<T, VEC>(out, ov);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                if (col + j < p.cols) out[j] = silu_mul_one(g[j], u[j]);
        }
    }
}

}  // namespace fusedops

#define FUSEDOPS_SILU_MUL_KERNEL(T, NAME, SUFFIX, VEC)                                                   \
    extern "C" __global__ void __launch_bounds__(1024) silu_mul_##NAME##_##SUFFIX(const __grid_constant__ SiluMulParams p) { \
        fusedops::pdl::enter();                                                                                              \
        fusedops::silu_mul_rows<T, VEC>(p);                                                              \
    }
#define FUSEDOPS_SILU_MUL_VARIANTS(T, NAME)                 \
    FUSEDOPS_SILU_MUL_KERNEL(T, NAME, v, fusedops::kVec16<T>) \
    FUSEDOPS_SILU_MUL_KERNEL(T, NAME, s, 1)

FUSEDOPS_SILU_MUL_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_SILU_MUL_VARIANTS(__half, fp16)
FUSEDOPS_SILU_MUL_VARIANTS(float, fp32)
