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

    // s becomes p = exp2(s * scale_log2 - max * scale_log2); o is rescaled for the new maxima.
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&o)[kMTiles][kDTiles][4],
                                           float scale_log2) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[mi][h];
#pragma unroll
                for (int ni = 0; ni < kNTiles; ++ni)
                    mx = fmaxf(mx, fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]));
                mx = quad_max(mx);
                // A row with nothing visible yet keeps max = -inf: subtract 0 so exp2 gives 0, not NaN.
                const float max_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
                const float correction = fast_exp2(row_max[mi][h] * scale_log2 - max_scaled);
                row_max[mi][h] = mx;
                float sum = 0.f;
#pragma unroll
                for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = fast_exp2(fmaf(s[mi][ni][2 * h + e], scale_log2, -max_scaled));
                        s[mi][ni][2 * h + e] = p;
                        sum += p;
                    }
                row_sum[mi][h] = fmaf(row_sum[mi][h], correction, sum);
#pragma unroll
                for (int di = 0; di < kDTiles; ++di) {
                    o[mi][di][2 * h] *= correction;
                    o[mi][di][2 * h + 1] *= correction;
                }
            }
    }
};

}  // namespace fusedops::attn
