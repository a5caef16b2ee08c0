// Skinny GEMM for decode token counts: out[M, N] = epilogue(x[M, K] @ W[N, K]^T), M <= 16, bf16 / fp16 in,
// fp32 accumulate. At these M the op is bound by streaming W once from HBM, so the kernel is built around
// the weight stream: every thread issues several 16-byte non-caching loads of W before it uses any.
//
// Tensor cores with the operands swapped (W rows are the mma's M side, tokens its N side): a CUDA-core GEMV
// needs 8·M FMAs per 16 weight bytes, which at M = 16 is about the H100's whole fp32 rate at copy bandwidth.
// One mma.sync m16n8k16 covers 16 W rows x 8 tokens. Because the sum over k does not care about order, each
// lane feeds the mma the 8 consecutive k it loaded with one 16-byte load (W rows g and g+8) and the same 8 k
// of x token g: the A and B fragments then agree on a permuted k, and no shuffle or shared-memory staging
// is needed. A CTA owns one 16-output slice; its warps split K and add their fragments through shared
// memory at the end, where the epilogue (bias, residual, or SwiGLU) runs once per output.
#include "common/pdl.cuh"
#include "attention/mma_sm80.cuh"
#include "common/gemv_epilogue.cuh"
#include "common/stream_load.cuh"
#include "common/vec.cuh"

struct GemvParams {
    void* out;
    const void* x;
    const void* weight;
    const void* bias;      // [N] or null (linear only)
    const void* residual;  // [M, N] rows or null (linear only): out = round(residual + x W^T)
    int64_t m;
    int64_t n;             // output columns (SwiGLU: the intermediate size, half of W's rows)
    int64_t k;
    int64_t x_row_stride;  // elements, all four
    int64_t w_row_stride;
    int64_t residual_row_stride;
    int64_t out_row_stride;
    int64_t block;         // SwiGLU: W interleaves gate and up rows in blocks of this many (multiple of 16)
    int64_t prefetch;      // 1: pull each warp's first W step toward L2 before the wait (off by default: slower)
};

namespace fusedops {
namespace gemv {

template <typename T_, int TOKEN_TILES, int WARPS, int UNROLL, bool SWIGLU>
struct Traits : CtaShape<T_, TOKEN_TILES, WARPS, UNROLL, SWIGLU> {
    static constexpr int kStepK = 4 * 8 * UNROLL;        // k one warp covers per step: 4 lanes x 8 x unroll
    static_assert(sizeof(T_) == 2, "mma.sync path is for 16-bit inputs");
};

// Every load of a step must be in flight before its first mma. Left alone, the compiler interleaved loads
// and mmas to save registers and kept only 2-5 loads in flight a thread (SASS of run 1: 8 warps x 4 loads
// reached 74 % of copy on qkv, fewer loads 87 %). So loads (common/stream_load.cuh) and mmas are volatile
// asm (NVVM keeps their order), a step never branches around a load, and a __syncwarp() between them stops
// ptxas moving loads down (SASS now: all of a step's LDG.128 before the first HMMA, the next step's issued
// under its mmas).

// mma of one 16-row W tile (lane's rows g, g+8: lo, hi) with one 8-token x tile, over the 8 k of one load.
template <typename T>
__device__ __forceinline__ void mma_8k(float (&acc)[4], const uint4& lo, const uint4& hi, const uint4& xv) {
    const uint32_t a_lo[4] = {lo.x, hi.x, lo.y, hi.y}, a_hi[4] = {lo.z, hi.z, lo.w, hi.w};
    attn::MmaOp<T>::run(acc, a_lo, xv.x, xv.y);
    attn::MmaOp<T>::run(acc, a_hi, xv.z, xv.w);
}

template <class Tr>
struct Cta {
    using T = typename Tr::T;
    const T* w[Tr::kRowTiles][2];      // this lane's W rows (g, g + 8) of each tile, at its k offset
    const T* x[Tr::kTokenTiles];       // this lane's x token (g, g + 8) at its k offset
    bool token_ok[Tr::kTokenTiles];
    float acc[Tr::kRowTiles][Tr::kTokenTiles][4];

    // One step of Tr::kStepK k starting at k0. CHECK: the step may run past K (the last, partial one).
    // Loads are never skipped, only their values zeroed: an out-of-range lane reads its row's first 8 k
    // (always inside the tensor) and zeroes both W and x — zeroing x alone is not enough, since memory past
    // the row may hold Inf/NaN bit patterns and Inf * 0 = NaN. A branch around a volatile load would split
    // the step and the loads would no longer issue together.
    template <bool CHECK>
    __device__ __forceinline__ void step(int64_t k0, int64_t k) {
        uint4 wv[Tr::kRowTiles][2][Tr::kUnroll], xv[Tr::kTokenTiles][Tr::kUnroll];
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u) {
            const bool in = !CHECK || k0 + 32 * u + 8 * (threadIdx.x & 3) < k;
            const int64_t at = in ? k0 + 32 * u : -8 * static_cast<int64_t>(threadIdx.x & 3);
#pragma unroll
            for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) wv[j][h][u] = load_weight(w[j][h] + at);
#pragma unroll
            for (int t = 0; t < Tr::kTokenTiles; ++t) xv[t][u] = load_x(x[t] + at);
#pragma unroll
            for (int t = 0; t < Tr::kTokenTiles; ++t)
                if (!(in && token_ok[t])) xv[t][u] = make_uint4(0, 0, 0, 0);  // zero x: its W products vanish
            if (!in) {
#pragma unroll
                for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) wv[j][h][u] = make_uint4(0, 0, 0, 0);
            }
        }
        __syncwarp();  // loads stay above, mmas below: ptxas otherwise interleaves them (see load_weight)
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
                for (int t = 0; t < Tr::kTokenTiles; ++t) mma_8k<T>(acc[j][t], wv[j][0][u], wv[j][1][u], xv[t][u]);
    }
};

// First W row of row tile j for the CTA whose outputs start at column col0.
template <class Tr>
__device__ __forceinline__ int64_t tile_row(const GemvParams& p, int64_t col0, int j) {
    if constexpr (Tr::kSwiglu) return (col0 / p.block) * 2 * p.block + col0 % p.block + j * p.block;
    return col0;
}

template <class Tr>
__device__ __forceinline__ void gemv_cta(const GemvParams& p) {
    using T = typename Tr::T;
    __shared__ float partial[Tr::kWarps][Tr::kFragments];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, quad = lane & 3;
    const int64_t col0 = static_cast<int64_t>(blockIdx.x) * 16;
    const int64_t w_rows = Tr::kSwiglu ? 2 * p.n : p.n;

    Cta<Tr> cta;
#pragma unroll
    for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // Rows past N (last CTA) read row N-1 and are never stored: no branch in the stream.
            const int64_t row = min(tile_row<Tr>(p, col0, j) + g + 8 * h, w_rows - 1);
            cta.w[j][h] = static_cast<const T*>(p.weight) + row * p.w_row_stride + 8 * quad;
        }
#pragma unroll
    for (int t = 0; t < Tr::kTokenTiles; ++t) {
        const int token = g + 8 * t;
        cta.token_ok[t] = token < p.m;
        cta.x[t] = static_cast<const T*>(p.x) + (cta.token_ok[t] ? token : 0) * p.x_row_stride + 8 * quad;
    }
    attn::zero_fragments(cta.acc);

    // W does not depend on the kernel before this one, so p.prefetch can start pulling this warp's first step
    // toward L2 while that kernel finishes (programmatic dependent launch, common/pdl.cuh). Measured slower
    // end to end (H200: 4.638 vs 4.529 ms a bf16 decode step), so off by default. Then wait for x.
    const int64_t full_steps = p.k / Tr::kStepK;
    if (p.prefetch && warp < full_steps) {
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) pdl::prefetch_l2(cta.w[j][h] + warp * Tr::kStepK + 32 * u);
    }
    pdl::enter();

    // Warps take steps round-robin, so at any moment a CTA streams kWarps adjacent steps of each row.
    for (int64_t s = warp; s < full_steps; s += Tr::kWarps) cta.template step<false>(s * Tr::kStepK, p.k);
    if (p.k % Tr::kStepK && full_steps % Tr::kWarps == warp) cta.template step<true>(full_steps * Tr::kStepK, p.k);

#pragma unroll
    for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
        for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
            for (int c = 0; c < 4; ++c) partial[warp][((j * Tr::kTokenTiles + t) * 32 + lane) * 4 + c] = cta.acc[j][t][c];
    __syncthreads();

    const Epilogue ep{p.out, p.bias, p.residual, p.out_row_stride, p.residual_row_stride, p.m, p.n};
    reduce_and_store<Tr>(partial, ep, col0);
}

}  // namespace gemv
}  // namespace fusedops

// Instantiations: gemv_<linear|swiglu>_<dtype>_m<8|16>_w<warps>_u<unroll> (fusedops/ops/gemv.py KERNELS).
#define FUSEDOPS_GEMV_KERNEL(T, SUFFIX, KIND, IS_SWIGLU, TILES, MAXM, W, U)                                           \
    extern "C" __global__ void __launch_bounds__(32 * W)                                                             \
        gemv_##KIND##_##SUFFIX##_m##MAXM##_w##W##_u##U(const __grid_constant__ GemvParams p) {                       \
        fusedops::gemv::gemv_cta<fusedops::gemv::Traits<T, TILES, W, U, IS_SWIGLU>>(p);                              \
    }
// SwiGLU reads two W tiles: at 16 warps (128 registers a thread) it spilled, so it stops at 8.
#define FUSEDOPS_GEMV_TUNINGS(T, SUFFIX, TILES, MAXM)                  \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, linear, false, TILES, MAXM, 8, 2)  \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, linear, false, TILES, MAXM, 8, 4)  \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, linear, false, TILES, MAXM, 16, 2) \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, linear, false, TILES, MAXM, 16, 4) \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, swiglu, true, TILES, MAXM, 4, 4)   \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, swiglu, true, TILES, MAXM, 8, 2)   \
    FUSEDOPS_GEMV_KERNEL(T, SUFFIX, swiglu, true, TILES, MAXM, 8, 4)
#define FUSEDOPS_GEMV_DTYPE(T, SUFFIX)            \
    FUSEDOPS_GEMV_TUNINGS(T, SUFFIX, 1, 8)        \
    FUSEDOPS_GEMV_TUNINGS(T, SUFFIX, 2, 16)

FUSEDOPS_GEMV_DTYPE(__nv_bfloat16, bf16)
FUSEDOPS_GEMV_DTYPE(__half, fp16)
