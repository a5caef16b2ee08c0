// W4A16 decode GEMV / skinny GEMM: out[m, n] = sum_k x[m, k] * ((q[n, k] - z[n, g]) * s[n, g]), fp32
// accumulation, for M <= 8 tokens; plus the dequantize kernel that feeds cuBLAS for more tokens.
// Weight layout (fusedops/quant.py): qweight int32 [N, K/8], element j of a word in nibble
// (j % 2) * 4 + j / 2, so one shift + lop3 turns a word into a bf16x2 / fp16x2 pair of consecutive k.
//
// Work split: a warp owns kRows weight rows; its lanes stride over K in chunks of 32 k (one 16-byte
// load per row), kUnroll chunks of every row loaded before any is used (kRows * kUnroll loads in
// flight per lane). Each x vector (8 k of one token) is converted once and reused by all kRows rows.
// Lanes finish with a butterfly shuffle reduction; the epilogue rounds like the bf16 HF module
// (product rounded to the model dtype before the residual add / SiLU).
#include <type_traits>

#include "common/vec.cuh"

struct GemvW4Params {
    void* out;                // [m, n_out], row stride out_stride
    const void* x;            // [m, k], row stride x_stride (16-byte aligned rows)
    const void* qweight;      // int32 [n, k / 8]
    const void* scales;       // [n, k / group]
    const void* zeros;        // [n, k / group] integer-valued, or null: symmetric, z = 8
    const void* residual;     // [m, n_out], row stride res_stride (residual epilogue only)
    int64_t m, n, k;          // n: weight rows (gate_up: 2 * n_out)
    int64_t x_stride, out_stride, res_stride;
    int64_t group;
};

struct DequantW4Params {
    void* out;                // [n, k] contiguous
    const void* qweight;
    const void* scales;
    const void* zeros;
    int64_t n, k, group;
};

namespace fusedops {

// A warp owns its rows over all of K. H100, 2026-11-25 (perf/notes/int4.md): the CTA's 4 warps splitting
// K instead measured 14.8 / 54.4 us (q/k/v, gate/up, M = 1) vs 12.2 / 39.3 here; only down_proj
// (K = 14336, 256 CTAs) gained, 26.5 vs 33.3 us, and the 32-layer step went 4.2 -> 4.5 ms.
constexpr int kWarps = 4;
constexpr int kRows = 4;      // weight rows per warp; even, so a SwiGLU warp holds 2 gate + 2 up rows
constexpr int kUnroll = 2;    // chunks per row loaded ahead: kRows * kUnroll = 8 x 16 B in flight a lane
constexpr int kChunk = 32;    // k per 16-byte weight load

enum Epilogue { kPlain = 0, kResidual = 1, kSwiGLU = 2 };

template <typename T> struct Half2Of;
template <> struct Half2Of<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static constexpr uint32_t kMagic = 0x43004300u;   // bf16 128.0 in both halves: 128 + q is exact
    static constexpr float kMagicValue = 128.0f;
};
template <> struct Half2Of<__half> {
    using type = __half2;
    static constexpr uint32_t kMagic = 0x64006400u;   // fp16 1024.0: 1024 + q is exact
    static constexpr float kMagicValue = 1024.0f;
};

template <typename T>
__device__ __forceinline__ typename Half2Of<T>::type splat2(float v) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat162_rn(v);
    else return __float2half2_rn(v);
}

template <typename T>
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
    } else {
        return __half22float2(*reinterpret_cast<const __half2*>(&bits));
    }
}

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
    uint32_t r;  // (a & mask) | magic in one instruction: immLut 0xea = (A & B) | C
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
    return r;
}

// The 8 weights of one word as floats: ((q - z) * s) rounded to T — exactly quant.dequantize's value.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, typename Half2Of<T>::type bias,
                                             typename Half2Of<T>::type scale, float (&w)[8]) {
    using H2 = typename Half2Of<T>::type;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint32_t biased = lop3_and_or(word >> (4 * i), 0x000f000fu, Half2Of<T>::kMagic);
        H2 v = __hmul2(__hsub2(*reinterpret_cast<H2*>(&biased), bias), scale);
        float2 f = pair_to_float2<T>(*reinterpret_cast<uint32_t*>(&v));
        w[2 * i] = f.x;
        w[2 * i + 1] = f.y;
    }
}

template <typename T>
__device__ __forceinline__ void load_x8(const T* ptr, float (&xf)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = pair_to_float2<T>(words[i]);
        xf[2 * i] = f.x;
        xf[2 * i + 1] = f.y;
    }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T, int MT, int EPI>
__device__ __forceinline__ void gemv_w4(const GemvW4Params& p) {
    using H2 = typename Half2Of<T>::type;
    constexpr int kOutRows = EPI == kSwiGLU ? kRows / 2 : kRows;
    const int lane = threadIdx.x % 32;
    const int64_t n_out = EPI == kSwiGLU ? p.n / 2 : p.n;
    const int64_t first_out = (int64_t(blockIdx.x) * kWarps + threadIdx.x / 32) * kOutRows;
    if (first_out >= n_out) return;

    int64_t row[kRows];
    bool valid[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int64_t out_row = first_out + r % kOutRows;
        valid[r] = out_row < n_out;
        row[r] = (EPI == kSwiGLU && r >= kOutRows) ? n_out + out_row : out_row;
    }
    const int64_t groups = p.k / p.group, chunks = p.k / kChunk;
    const uint4* qw = static_cast<const uint4*>(p.qweight);
    const T* scales = static_cast<const T*>(p.scales);
    const T* zeros = static_cast<const T*>(p.zeros);
    const T* x = static_cast<const T*>(p.x);

    float acc[kRows][MT];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
        uint4 wq[kUnroll][kRows];
        H2 scale[kUnroll][kRows], bias[kUnroll][kRows];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                const bool live = valid[r] && c < chunks;
                wq[u][r] = live ? __ldg(qw + row[r] * chunks + c) : make_uint4(0, 0, 0, 0);
                const int64_t g = row[r] * groups + (live ? c * kChunk / p.group : 0);
                const float s = live ? to_float(__ldg(scales + g)) : 0.f;
                const float z = zeros != nullptr && live ? to_float(__ldg(zeros + g)) : 8.f;
                scale[u][r] = splat2<T>(s);
                bias[u][r] = splat2<T>(Half2Of<T>::kMagicValue + z);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t c = c0 + 32 * u;
            if (c >= chunks) break;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float w[kRows][8];
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    const uint32_t word = j == 0 ? wq[u][r].x : j == 1 ? wq[u][r].y : j == 2 ? wq[u][r].z : wq[u][r].w;
                    dequant_word<T>(word, bias[u][r], scale[u][r], w[r]);
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m >= p.m) break;
                    float xf[8];
                    load_x8(x + m * p.x_stride + c * kChunk + j * 8, xf);
#pragma unroll
                    for (int r = 0; r < kRows; ++r)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(w[r][e], xf[e], acc[r][m]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int off = 16; off > 0; off /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);

    T* out = static_cast<T*>(p.out);
    const T* residual = static_cast<const T*>(p.residual);
    // Output (r, m) is written by lane (r * MT + m) % 32: the stores spread over the warp.
#pragma unroll
    for (int r = 0; r < kOutRows; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m >= p.m || !valid[r] || lane != (r * MT + m) % 32) continue;
            const int64_t o = first_out + r;
            float y = round_to<T>(acc[r][m]);
            if constexpr (EPI == kResidual) {
                y += to_float(residual[m * p.res_stride + o]);
            } else if constexpr (EPI == kSwiGLU) {
                const float silu = round_to<T>(y / (1.f + __expf(-y)));
                y = silu * round_to<T>(acc[r + kOutRows][m]);
            }
            out[m * p.out_stride + o] = from_float<T>(y);
        }
    }
}

// One thread per word: 8 weights -> one 16-byte store of ((q - z) * s) in T.
template <typename T>
__device__ __forceinline__ void dequant_w4(const DequantW4Params& p) {
    const int64_t words_per_row = p.k / 8;
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= p.n * words_per_row) return;
    const int64_t row = idx / words_per_row, g = row * (p.k / p.group) + (idx % words_per_row) * 8 / p.group;
    const float s = to_float(static_cast<const T*>(p.scales)[g]);
    const float z = p.zeros != nullptr ? to_float(static_cast<const T*>(p.zeros)[g]) : 8.f;
    float w[8];
    dequant_word<T>(static_cast<const uint32_t*>(p.qweight)[idx], splat2<T>(Half2Of<T>::kMagicValue + z),
                    splat2<T>(s), w);
    Vec<T, 8> v;
#pragma unroll
    for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(w[e]);  // exact: w already holds T values
    store_vec(static_cast<T*>(p.out) + idx * 8, v);
}

}  // namespace fusedops

// min 1 CTA an SM: without it ptxas held the SwiGLU m4 tile to 128 registers and spilled 8 bytes (the others
// already used 124-156 registers); with it no variant spills (101-158 registers).
#define FUSEDOPS_GEMV_W4(T, NAME, EPI, EPI_NAME, MT)                                                        \
    extern "C" __global__ void __launch_bounds__(fusedops::kWarps * 32, 1)                                  \
        gemv_w4_##EPI_NAME##_##NAME##_m##MT(const __grid_constant__ GemvW4Params p) {                       \
        fusedops::gemv_w4<T, MT, fusedops::EPI>(p);                                                         \
    }
#define FUSEDOPS_GEMV_W4_TILES(T, NAME, EPI, EPI_NAME)                                                      \
    FUSEDOPS_GEMV_W4(T, NAME, EPI, EPI_NAME, 1)                                                             \
    FUSEDOPS_GEMV_W4(T, NAME, EPI, EPI_NAME, 2)                                                             \
    FUSEDOPS_GEMV_W4(T, NAME, EPI, EPI_NAME, 4)                                                             \
    FUSEDOPS_GEMV_W4(T, NAME, EPI, EPI_NAME, 8)
#define FUSEDOPS_W4_DTYPE(T, NAME)                                                                          \
    FUSEDOPS_GEMV_W4_TILES(T, NAME, kPlain, linear)                                                         \
    FUSEDOPS_GEMV_W4_TILES(T, NAME, kResidual, residual)                                                    \
    FUSEDOPS_GEMV_W4_TILES(T, NAME, kSwiGLU, swiglu)                                                        \
    extern "C" __global__ void __launch_bounds__(256) dequant_w4_##NAME(const __grid_constant__ DequantW4Params p) { \
        fusedops::dequant_w4<T>(p);                                                                         \
    }

FUSEDOPS_W4_DTYPE(__nv_bfloat16, bf16)
FUSEDOPS_W4_DTYPE(__half, fp16)
