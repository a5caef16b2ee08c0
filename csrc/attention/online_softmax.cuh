// Online softmax over one S tile held in mma accumulators (fp32, exp2 domain), and the masking of
// one tile. Each thread holds, per m16 tile, two rows (lane/4 and lane/4 + 8) and two adjacent
// columns per n8 tile; a row is spread over the 4 lanes of a quad, so row reductions are two shuffles.
#pragma once
#include <math.h>

#include "attention/mma_sm80.cuh"

namespace fusedops::attn {

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kMTiles, int kNTiles, int kDTiles>
struct OnlineSoftmax {
    float row_max[kMTiles][2];   // raw-score units; -inf until a visible key is seen
    float row_sum[kMTiles][2];   // this thread's partial sum of exp2 terms (quad-reduced at the end)

    __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                row_max[mi][h] = -INFINITY;
                row_sum[mi][h] = 0.f;
            }
    }

    // p = exp2(s * scale_log2 - max * scale_log2), written straight into mma A fragments of type T
    // (the C layout of n8 tiles 2kk, 2kk+1 is the A layout of k16 step kk) so s dies early; o is
    // rescaled for the new maxima. Phases run over all rows at once, so shuffles and exp2 of
    // different rows overlap; the one branch (skip the rescale when no row max moved) comes last.
    template <typename T>
    __device__ __forceinline__ void update(const float (&s)[kMTiles][kNTiles][4], float (&o)[kMTiles][kDTiles][4],
                                           uint32_t (&pa)[kMTiles][kNTiles / 2][4], float scale_log2) {
        float mx[kMTiles][2], max_scaled[kMTiles][2], correction[kMTiles][2];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[mi][h] = row_max[mi][h];
#pragma unroll
                for (int ni = 0; ni < kNTiles; ++ni)
                    mx[mi][h] = fmaxf(mx[mi][h], fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]));
            }
        bool moved = false;
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[mi][h] = quad_max(mx[mi][h]);
                // A row with nothing visible yet keeps max = -inf: subtract 0 so exp2 gives 0, not NaN.
                max_scaled[mi][h] = mx[mi][h] == -INFINITY ? 0.f : mx[mi][h] * scale_log2;
                correction[mi][h] = fast_exp2(row_max[mi][h] * scale_log2 - max_scaled[mi][h]);
                moved |= mx[mi][h] != row_max[mi][h];
                row_max[mi][h] = mx[mi][h];
            }
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float sum = 0.f;
#pragma unroll
                for (int ni = 0; ni < kNTiles; ++ni) {
                    const float p0 = fast_exp2(fmaf(s[mi][ni][2 * h], scale_log2, -max_scaled[mi][h]));
                    const float p1 = fast_exp2(fmaf(s[mi][ni][2 * h + 1], scale_log2, -max_scaled[mi][h]));
                    pa[mi][ni / 2][(ni % 2) * 2 + h] = pack2<T>(p0, p1);
                    sum += p0 + p1;
                }
                row_sum[mi][h] = fmaf(row_sum[mi][h], correction[mi][h], sum);
            }
        if (moved) {  // the maxima rarely move once rows have seen a few tiles
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
                for (int di = 0; di < kDTiles; ++di)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[mi][di][e] *= correction[mi][e / 2];
        }
    }
};

}  // namespace fusedops::attn
