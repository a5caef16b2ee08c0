// Batched transpose of the last two dims: out[b, j, i] = x[b, i, j], out contiguous [B, N, M].
// Through shared memory, so that both the reads (along x's rows) and the writes (along out's rows)
// are coalesced: a warp moves 128 contiguous bytes each time. A tile is 32 x 32 "words" of P
// elements (P = 4 / sizeof(T): 64 x 64 elements for 16-bit types, 32 x 32 for fp32), staged with a
// row pitch of TILE + 1 elements: an odd pitch puts the 32 elements a warp reads down a column of the
// tile in 32 different banks (conflict-free in both phases; checked by the bank arithmetic below).
// WIDE: 4-byte global accesses (needs N and M multiples of P and 4-byte aligned rows); otherwise
// element accesses with the same tile.
#include "common/pdl.cuh"
#include "common/vec.cuh"

struct TransposeParams {
    void* out;
    const void* x;
    int64_t batch;
    int64_t rows;              // M
    int64_t cols;              // N
    int64_t x_batch_stride;    // elements
    int64_t x_row_stride;      // elements
};

constexpr int kBlockRows = 8;      // 32 x 8 threads; each covers TILE / 8 rows of the tile
constexpr int kMinCtasPerSm = 4;   // caps registers at 64: left alone, the edge-tile path took 108 (2 CTAs an SM)

namespace fusedops {

// P elements moved as one 32-bit word (a plain Vec<T, 2> store was split into two 16-bit stores).
template <typename T, int P>
union Word {
    uint32_t bits;
    Vec<T, P> v;
};

template <typename T, bool WIDE>
__device__ __forceinline__ void transpose_tile(const TransposeParams& p) {
    constexpr int P = 4 / sizeof(T) > 0 ? 4 / sizeof(T) : 1;
    constexpr int TILE = 32 * P, PITCH = TILE + 1;
    // Bank of element (r, c): (r * PITCH + c) * sizeof(T) / 4 mod 32. Column reads step r by P per
    // lane (r = P * lane + k): P * PITCH * sizeof(T) / 4 = PITCH words, odd, so lanes hit distinct banks.
    static_assert(PITCH % 2 == 1, "the tile pitch must be odd for conflict-free column reads");
    __shared__ T tile[TILE * PITCH];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t i0 = static_cast<int64_t>(blockIdx.y) * TILE, j0 = static_cast<int64_t>(blockIdx.x) * TILE;
    const bool full = i0 + TILE <= p.rows && j0 + TILE <= p.cols;
    for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
        const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride;
        T* out = static_cast<T*>(p.out) + b * p.rows * p.cols;
        // Load: tile row r = x row i0 + r; lane tx takes elements P*tx .. P*tx + P - 1.
        if (WIDE && full) {
#pragma unroll
            for (int step = 0; step < TILE / kBlockRows; ++step) {
                const int r = ty + step * kBlockRows;
                Word<T, P> w;
                w.bits = *reinterpret_cast<const uint32_t*>(x + (i0 + r) * p.x_row_stride + j0 + P * tx);
#pragma unroll
                for (int k = 0; k < P; ++k) tile[r * PITCH + P * tx + k] = w.v.v[k];
            }
        } else {
#pragma unroll
            for (int step = 0; step < TILE / kBlockRows; ++step) {
                const int r = ty + step * kBlockRows;
                const int64_t i = i0 + r, j = j0 + P * tx;
#pragma unroll
                for (int k = 0; k < P; ++k)
                    if (i < p.rows && j + k < p.cols) tile[r * PITCH + P * tx + k] = x[i * p.x_row_stride + j + k];
            }
        }
        __syncthreads();
        // Store: out row j0 + c takes tile column c; lane tx writes out elements P*tx .. P*tx + P - 1,
        // i.e. tile rows P*tx + k of that column.
        if (WIDE && full) {
#pragma unroll
            for (int step = 0; step < TILE / kBlockRows; ++step) {
                const int c = ty + step * kBlockRows;
                Word<T, P> w;
#pragma unroll
                for (int k = 0; k < P; ++k) w.v.v[k] = tile[(P * tx + k) * PITCH + c];
                *reinterpret_cast<uint32_t*>(out + (j0 + c) * p.rows + i0 + P * tx) = w.bits;
            }
        } else {
#pragma unroll
            for (int step = 0; step < TILE / kBlockRows; ++step) {
                const int c = ty + step * kBlockRows;
                const int64_t j = j0 + c, i = i0 + P * tx;
#pragma unroll
                for (int k = 0; k < P; ++k)
                    if (j < p.cols && i + k < p.rows) out[j * p.rows + i + k] = tile[(P * tx + k) * PITCH + c];
            }
        }
        __syncthreads();
    }
}

}  // namespace fusedops

#define FUSEDOPS_TRANSPOSE_KERNEL(T, NAME, SUFFIX, WIDE)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * kBlockRows, kMinCtasPerSm) transpose_##NAME##_##SUFFIX(const __grid_constant__ TransposeParams p) { \
        fusedops::pdl::enter();                                                                                                                           \
        fusedops::transpose_tile<T, WIDE>(p);                                                                 \
    }
// fp32 words are single elements, always "wide": it has no narrow variant.
FUSEDOPS_TRANSPOSE_KERNEL(__nv_bfloat16, bf16, wide, true)
FUSEDOPS_TRANSPOSE_KERNEL(__nv_bfloat16, bf16, narrow, false)
FUSEDOPS_TRANSPOSE_KERNEL(__half, fp16, wide, true)
FUSEDOPS_TRANSPOSE_KERNEL(__half, fp16, narrow, false)
FUSEDOPS_TRANSPOSE_KERNEL(float, fp32, wide, true)
