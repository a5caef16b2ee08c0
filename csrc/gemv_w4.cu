// W4A16 decode GEMV / skinny GEMM on tensor cores: out[m, n] = epilogue(x[m, :] . W[n, :]) for M <= 16
// tokens, W[n, k] = (q - z) * s of the row's group rounded to the model dtype (quant.dequantize's value),
// fp32 accumulation; plus the dequantize kernel that feeds cuBLAS above 16 tokens.
//
// csrc/gemv.cu's design with int4 weights. W rows are the M side of mma.sync m16n8k16, tokens its N side.
// A lane's 16-byte load of packed int4 is 32 consecutive k of ONE row (rows g and g + 8 of the tile,
// g = lane / 4), dequantized in registers straight into A fragments; its B fragment is x of token g at the
// same 32 k (four 16-byte loads), so A and B agree on a permuted k and nothing is shuffled or staged. The
// 32 k of a load lie in one quantization group (32 | group): one scale and one zero per load.
//
// Dequantization (layout in fusedops/quant.py): element j of a word sits in nibble (j % 2) * 4 + j / 2, so
// lop3((word >> 4i) & 0x000F000F | magic) is the pair (k 2i, 2i + 1) as bf16x2 (128 + q) or fp16x2
// (1024 + q); sub.bf16x2 by (magic + z) gives the exact integer q - z, which the mma multiplies by x. The
// scale is applied after the mma, in fp32: the 32 k of a lane's load, and so the 128 k a quad feeds one mma,
// share one group (group >= 128), so each 16-row x 8-token product of a load is scaled by its rows' s once.
// 11 ALU instructions per 8 weights, 4 fewer than scaling W in bf16 (H200: 2-3 % faster; the kernel is
// latency-bound, not issue-bound, perf/notes/int4.md); the tensor cores do every multiply-add.
//
// A CTA owns 16 outputs (SwiGLU: their 16 gate and 16 up rows); its warps split K round-robin in steps of
// kStepK and add their fragments through shared memory once, where the epilogue runs in fp32 and rounds
// once (bias-free linear, + residual, or silu(gate) * up), as csrc/gemv.cu does.
#include "common/pdl.cuh"
#include "attention/mma_sm80.cuh"
#include "common/gemv_epilogue.cuh"
#include "common/stream_load.cuh"
#include "common/vec.cuh"

struct GemvW4Params {
    void* out;                // [m, n_out] rows, row stride out_stride
    const void* x;            // [m, k] rows, row stride x_stride (16-byte aligned rows)
    const void* qweight;      // int32 [n, k / 8]
    const void* scales;       // [n, k / group]
    const void* zeros;        // [n, k / group] integer-valued, or null: symmetric, z = 8
    const void* residual;     // [m, n_out] rows or null: out = round(residual + x W^T)
    int64_t m, n, k;          // n: weight rows (SwiGLU: 2 * n_out, [Wg; Wu])
    int64_t x_stride, out_stride, res_stride;
    int64_t group_shift;      // log2(group); group is a power of two >= 32
};

struct DequantW4Params {
    void* out;                // [n, k] contiguous
    const void* qweight;
    const void* scales;
    const void* zeros;
    int64_t n, k, group;
};

namespace fusedops {
namespace gemv_w4 {

template <typename T> struct Int4Magic;
template <> struct Int4Magic<__nv_bfloat16> {
    static constexpr uint32_t kPair = 0x43004300u;  // bf16 128.0 twice: 128 + q is exact (ulp 1 at 128)
    static constexpr uint16_t kEight = 0x4100;      // bf16 8.0: the symmetric zero point
};
template <> struct Int4Magic<__half> {
    static constexpr uint32_t kPair = 0x64006400u;  // fp16 1024.0 twice: 1024 + q is exact
    static constexpr uint16_t kEight = 0x4800;      // fp16 8.0
};

template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct Pair<__half> { using type = __half2; };

__device__ __forceinline__ uint32_t splat(uint16_t bits) { return __byte_perm(bits, 0, 0x1010); }

template <typename T>
__device__ __forceinline__ uint32_t sub_mul(uint32_t a, uint32_t b, uint32_t c) {  // (a - b) * c, paired
    using P = typename Pair<T>::type;
    const P r = __hmul2(__hsub2(*reinterpret_cast<const P*>(&a), *reinterpret_cast<const P*>(&b)),
                        *reinterpret_cast<const P*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
}

template <typename T>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    using P = typename Pair<T>::type;
    const P r = __hsub2(*reinterpret_cast<const P*>(&a), *reinterpret_cast<const P*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
}

template <typename T>
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    using P = typename Pair<T>::type;
    const P r = __hadd2(*reinterpret_cast<const P*>(&a), *reinterpret_cast<const P*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// The scale and the (magic + zero) of one row's group, each in both halves of a register.
struct GroupPair {
    uint32_t scale, bias;
};

// magic + z in both halves: exact (magic + an integer <= 15); subtracting it from lop3's (magic + q) gives q - z.
template <typename T>
__device__ __forceinline__ uint32_t zero_bias(uint16_t zero) {
    return add2<T>(splat(zero), Int4Magic<T>::kPair);
}

template <typename T>
__device__ __forceinline__ GroupPair group_pair(uint16_t scale, uint16_t zero) {
    return {splat(scale), zero_bias<T>(zero)};
}

// The 4 pairs (k 0-1, 2-3, 4-5, 6-7) of one word as T pairs ((q - z) * s, rounded once): the dequantize
// kernel's values (quant.dequantize's).
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, const GroupPair& gp, uint32_t (&pairs)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint32_t biased;  // ((word >> 4i) & 0x000f000f) | magic in one instruction: immLut 0xea = (A & B) | C
        asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(word >> (4 * i)), "r"(0x000f000fu),
            "r"(Int4Magic<T>::kPair));
        pairs[i] = sub_mul<T>(biased, gp.bias, gp.scale);
    }
}

// The 4 pairs of one word as exact T pairs q - z (bias = magic + z): the GEMV's A fragments.
template <typename T>
__device__ __forceinline__ void unpack_word(uint32_t word, uint32_t bias, uint32_t (&pairs)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint32_t biased;
        asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(word >> (4 * i)), "r"(0x000f000fu),
            "r"(Int4Magic<T>::kPair));
        pairs[i] = sub2<T>(biased, bias);
    }
}

// Scales and zeros are read once per 32 k per row: tiny and shared by the quad, cached.
__device__ __forceinline__ uint16_t load_u16(const void* ptr) {
    uint16_t v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
    return v;
}

template <typename T_, int TOKEN_TILES, int WARPS, int UNROLL, bool SWIGLU>
struct Traits : gemv::CtaShape<T_, TOKEN_TILES, WARPS, UNROLL, SWIGLU> {
    static constexpr int kLoadK = 32;                    // k in one 16-byte load of packed int4
    static constexpr int kStepK = 4 * kLoadK * UNROLL;   // k one warp covers per step: 4 lanes x 32 x unroll
};

// What one step loads: W with its groups' scales and zeros, and x at the same k.
template <class Tr>
struct Stage {
    uint4 w[Tr::kRowTiles][2][Tr::kUnroll];
    uint16_t scale[Tr::kRowTiles][2][Tr::kUnroll], zero[Tr::kRowTiles][2][Tr::kUnroll];
    uint4 x[Tr::kTokenTiles][Tr::kUnroll][4];
};

// Where load u of a step starting at k0 reads. CHECK: the step may run past K (the last, partial one); K
// is a multiple of 128, so a load is all in or all out. An out-of-range lane reads its row's first 32 k and
// group (finite weights) and zeroes x; no load is skipped, so a step's loads issue together. Tokens past M
// read token 0: an mma column depends only on its own token, and those columns are never stored.
struct Chunk {
    bool in;
    int64_t at, group, x_at;  // in 16-byte W loads, groups and x elements from the lane's pointers
};

template <class Tr, bool CHECK>
__device__ __forceinline__ Chunk chunk(int64_t k0, int u, const GemvW4Params& p) {
    const int quad = threadIdx.x & 3;
    const int64_t ku = k0 + 4 * Tr::kLoadK * u;  // the quad's first k of load u
    const bool in = !CHECK || ku + Tr::kLoadK * quad < p.k;
    return {in, in ? ku / Tr::kLoadK : -quad, in ? (ku + Tr::kLoadK * quad) >> p.group_shift : 0,
            in ? ku : -Tr::kLoadK * quad};
}

template <typename T> __device__ __forceinline__ float half_to_float(uint16_t bits);
template <> __device__ __forceinline__ float half_to_float<__nv_bfloat16>(uint16_t bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
template <> __device__ __forceinline__ float half_to_float<__half>(uint16_t bits) {
    return __half2float(__ushort_as_half(bits));
}

template <class Tr>
struct Cta {
    using T = typename Tr::T;
    const uint4* w[Tr::kRowTiles][2];      // this lane's W rows (g, g + 8) of each tile, at its 32-k offset
    const T* scale[Tr::kRowTiles][2];      // the same rows' groups
    int64_t zero_delta;                    // zeros - scales in elements (symmetric: 0, replaced by 8 after the load)
    const T* x[Tr::kTokenTiles];           // this lane's x token (g, g + 8) at its 32-k offset
    float acc[Tr::kRowTiles][Tr::kTokenTiles][4];

    __device__ __forceinline__ void load(int u, const Chunk& c, Stage<Tr>& st) const {
#pragma unroll
        for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                st.w[j][h][u] = load_weight(w[j][h] + c.at);
                st.scale[j][h][u] = load_u16(scale[j][h] + c.group);
                st.zero[j][h][u] = load_u16(scale[j][h] + zero_delta + c.group);
            }
#pragma unroll
        for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) st.x[t][u][i] = load_x(x[t] + c.x_at + 8 * i);
        if (!c.in) {
#pragma unroll
            for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) st.x[t][u][i] = make_uint4(0, 0, 0, 0);  // its W products vanish
        }
    }

    // Per load and row tile: (q - z) . x of the load's 32 k (two mma chains from zero: the k16 halves of a
    // word), then acc += s * that, in fp32; rows g (accumulator elements 0, 1) and g + 8 (2, 3).
    __device__ __forceinline__ void compute(const Stage<Tr>& st, bool symmetric) {
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < Tr::kRowTiles; ++j) {
                uint32_t bias[2];
                float s[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    bias[h] = zero_bias<T>(symmetric ? Int4Magic<T>::kEight : st.zero[j][h][u]);
                    s[h] = half_to_float<T>(st.scale[j][h][u]);
                }
                float part[Tr::kTokenTiles][2][4] = {};
#pragma unroll
                for (int word = 0; word < 4; ++word) {
                    uint32_t lo[4], hi[4];  // rows g and g + 8, k 8 word + 0..7 of this lane's 32: q - z
                    unpack_word<T>((&st.w[j][0][u].x)[word], bias[0], lo);
                    unpack_word<T>((&st.w[j][1][u].x)[word], bias[1], hi);
                    const uint32_t a_lo[4] = {lo[0], hi[0], lo[1], hi[1]}, a_hi[4] = {lo[2], hi[2], lo[3], hi[3]};
#pragma unroll
                    for (int t = 0; t < Tr::kTokenTiles; ++t) {
                        const uint4& xw = st.x[t][u][word];  // token g, the same 8 k
                        attn::MmaOp<T>::run(part[t][0], a_lo, xw.x, xw.y);
                        attn::MmaOp<T>::run(part[t][1], a_hi, xw.z, xw.w);
                    }
                }
#pragma unroll
                for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[j][t][e] = fmaf(s[e >> 1], part[t][0][e] + part[t][1][e], acc[j][t][e]);
            }
    }

    // One step starting at k0: all its loads, then its mmas. __syncwarp between them: ptxas otherwise
    // interleaves them (csrc/gemv.cu).
    template <bool CHECK>
    __device__ __forceinline__ void step(int64_t k0, const GemvW4Params& p) {
        Stage<Tr> st;
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u) load(u, chunk<Tr, CHECK>(k0, u, p), st);
        __syncwarp();
        compute(st, p.zeros == nullptr);
    }
};

template <class Tr>
__device__ __forceinline__ void gemv_w4_cta(const GemvW4Params& p) {
    using T = typename Tr::T;
    __shared__ float partial[Tr::kWarps][Tr::kFragments];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, quad = lane & 3;
    const int64_t n_out = Tr::kSwiglu ? p.n / 2 : p.n;
    const int64_t col0 = static_cast<int64_t>(blockIdx.x) * 16;
    const int64_t loads_per_row = p.k / Tr::kLoadK, groups = p.k >> p.group_shift;

    Cta<Tr> cta;
#pragma unroll
    for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // Rows past n_out (last CTA) read row n_out - 1 of their half and are never stored.
            const int64_t row = min(col0 + g + 8 * h, n_out - 1) + j * n_out;
            cta.w[j][h] = static_cast<const uint4*>(p.qweight) + row * loads_per_row + quad;
            cta.scale[j][h] = static_cast<const T*>(p.scales) + row * groups;
        }
    cta.zero_delta = p.zeros ? static_cast<const T*>(p.zeros) - static_cast<const T*>(p.scales) : 0;
#pragma unroll
    for (int t = 0; t < Tr::kTokenTiles; ++t) {
        const int token = g + 8 * t;
        cta.x[t] = static_cast<const T*>(p.x) + (token < p.m ? token : 0) * p.x_stride + Tr::kLoadK * quad;
    }
    attn::zero_fragments(cta.acc);
    pdl::enter();

    // Warps take steps round-robin, so at any moment a CTA streams kWarps adjacent steps of each row.
    const int steps = static_cast<int>((p.k + Tr::kStepK - 1) / Tr::kStepK);
    const int full_steps = static_cast<int>(p.k / Tr::kStepK);
    for (int s = warp; s < full_steps; s += Tr::kWarps) cta.template step<false>(static_cast<int64_t>(s) * Tr::kStepK, p);
    if (steps > full_steps && full_steps % Tr::kWarps == warp)
        cta.template step<true>(static_cast<int64_t>(full_steps) * Tr::kStepK, p);

#pragma unroll
    for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
        for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
            for (int c = 0; c < 4; ++c) partial[warp][((j * Tr::kTokenTiles + t) * 32 + lane) * 4 + c] = cta.acc[j][t][c];
    __syncthreads();

    const gemv::Epilogue ep{p.out, nullptr, p.residual, p.out_stride, p.res_stride, p.m, n_out};
    gemv::reduce_and_store<Tr>(partial, ep, col0);
}

// One thread per word: 8 weights -> one 16-byte store of ((q - z) * s) in T, the GEMV's values.
template <typename T>
__device__ __forceinline__ void dequant_w4(const DequantW4Params& p) {
    const int64_t words_per_row = p.k / 8;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= p.n * words_per_row) return;
    const int64_t row = idx / words_per_row, group = row * (p.k / p.group) + (idx % words_per_row) * 8 / p.group;
    const uint16_t* scales = static_cast<const uint16_t*>(p.scales);
    const uint16_t zero = p.zeros ? static_cast<const uint16_t*>(p.zeros)[group] : Int4Magic<T>::kEight;
    uint32_t pairs[4];
    dequant_word<T>(static_cast<const uint32_t*>(p.qweight)[idx], group_pair<T>(scales[group], zero), pairs);
    reinterpret_cast<uint4*>(p.out)[idx] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
}

}  // namespace gemv_w4
}  // namespace fusedops

// Instantiations: gemv_w4_<linear|swiglu>_<dtype>_m<8|16>_w<warps>_u<loads a step>_b<min CTAs an SM>, the
// table fusedops/ops/gemm_w4.py TUNINGS. The min-CTA bound sets ptxas' register cap: each entry is the
// tightest cap (most resident warps) that spills nothing for its (warps, loads) at sm_90a.
#define FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, KIND, IS_SWIGLU, TILES, MAXM, W, U, B)                              \
    extern "C" __global__ void __launch_bounds__(32 * W, B)                                                   \
        gemv_w4_##KIND##_##SUFFIX##_m##MAXM##_w##W##_u##U##_b##B(const __grid_constant__ GemvW4Params p) {     \
        fusedops::gemv_w4::gemv_w4_cta<fusedops::gemv_w4::Traits<T, TILES, W, U, IS_SWIGLU>>(p);              \
    }
#define FUSEDOPS_GEMV_W4_DTYPE(T, SUFFIX)                                                                     \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 1, 4)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 2, 2)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 16, 1, 2)                                     \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 4, 4, 3)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 8, 1, 3)                                     \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 16, 1, 1)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 4, 2, 4)                                     \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 8, 1, 3)                                       \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 4, 1, 4)                                       \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 4, 2, 3)                                       \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 16, 1, 1)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 8, 1, 2)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 4, 2, 2)                                      \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 16, 1, 1)                                     \
    extern "C" __global__ void __launch_bounds__(256) dequant_w4_##SUFFIX(const __grid_constant__ DequantW4Params p) { \
        fusedops::pdl::enter();                                                                                        \
        fusedops::gemv_w4::dequant_w4<T>(p);                                                                  \
    }

FUSEDOPS_GEMV_W4_DTYPE(__nv_bfloat16, bf16)
FUSEDOPS_GEMV_W4_DTYPE(__half, fp16)
