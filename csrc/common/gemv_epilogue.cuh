// What both decode GEMVs (csrc/gemv.cu, csrc/gemv_w4.cu) share: the CTA's shape, and its end. A CTA's warps
// split K, so each warp leaves its fp32 accumulator fragments in shared memory; reduce_and_store sums them per
// output and runs the epilogue once per output, in fp32 with one rounding to T: silu(gate) * up, or + bias,
// + residual.
#pragma once
#include "common/vec.cuh"

namespace fusedops {
namespace gemv {

// One CTA owns 16 outputs (SwiGLU: a 16-row gate tile and its up tile) for up to 8 * TOKEN_TILES tokens.
// Each kernel's Traits adds how a step walks K (kStepK, ...).
template <typename T_, int TOKEN_TILES, int WARPS, int UNROLL, bool SWIGLU>
struct CtaShape {
    using T = T_;
    static constexpr int kTokenTiles = TOKEN_TILES;      // 8-token mma tiles: M <= 8 * kTokenTiles
    static constexpr int kWarps = WARPS;                 // split K inside the CTA
    static constexpr int kUnroll = UNROLL;               // 16-byte loads per W row per lane per step
    static constexpr bool kSwiglu = SWIGLU;
    static constexpr int kRowTiles = SWIGLU ? 2 : 1;     // 16-row W tiles per CTA: gate + up, or one
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kFragments = kRowTiles * kTokenTiles * 128;  // accumulator floats per warp
    static constexpr int kSmemBytes = kWarps * kFragments * 4;
    static_assert(kSmemBytes <= 48 * 1024, "partial sums must fit static shared memory");
};

struct Epilogue {
    void* out;
    const void* bias;      // [N] or null
    const void* residual;  // [M, N] rows or null
    int64_t out_stride;    // elements
    int64_t residual_stride;
    int64_t m;             // tokens
    int64_t n;             // output columns
};

// partial: [kWarps][kFragments] floats, one 128-float mma accumulator grid per (row tile, token tile) and
// warp; col0: the CTA's first output column. Tr: a CtaShape.
template <class Tr>
__device__ __forceinline__ void reduce_and_store(const float (*partial)[Tr::kFragments], const Epilogue& ep,
                                                 int64_t col0) {
    using T = typename Tr::T;
    constexpr int ROW_TILES = Tr::kRowTiles, TOKEN_TILES = Tr::kTokenTiles;
    // Accumulator element i of a token tile: lane i/4 holds rows (lane/4, +8 for c >= 2), tokens 2(lane%4) + c%2.
    for (int i = threadIdx.x; i < TOKEN_TILES * 128; i += Tr::kThreads) {
        const int t = i >> 7, e = i & 127, c = e & 3, ln = e >> 2;
        const int64_t token = 8 * t + 2 * (ln & 3) + (c & 1);
        const int64_t col = col0 + (ln >> 2) + (c & 2 ? 8 : 0);
        if (token >= ep.m || col >= ep.n) continue;
        float sum[ROW_TILES];
#pragma unroll
        for (int j = 0; j < ROW_TILES; ++j) {
            sum[j] = 0.f;
#pragma unroll
            for (int w = 0; w < Tr::kWarps; ++w) sum[j] += partial[w][(j * TOKEN_TILES + t) * 128 + e];
        }
        T* out = static_cast<T*>(ep.out) + token * ep.out_stride + col;
        if constexpr (Tr::kSwiglu) {
            // silu(gate) * up from the fp32 sums, rounded once (as the CUTLASS SwiGLU epilogue does;
            // eager HF rounds the products and silu(gate) to the model dtype first).
            const float gate = sum[0], up = sum[1];
            *out = from_float<T>(gate / (1.f + __expf(-gate)) * up);
        } else {
            float y = sum[0];
            if (ep.bias) y += to_float(static_cast<const T*>(ep.bias)[col]);
            if (ep.residual)  // residual + o_proj(x) in fp32, rounded once (the CUTLASS epilogue's rounding)
                y += to_float(static_cast<const T*>(ep.residual)[token * ep.residual_stride + col]);
            *out = from_float<T>(y);
        }
    }
}

}  // namespace gemv
}  // namespace fusedops
