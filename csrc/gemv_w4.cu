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
// (1024 + q); sub.bf16x2 by (magic + z) gives the exact integer q - z and mul.bf16x2 by s rounds once.
// 15 ALU instructions per 8 weights; the tensor cores do every multiply-add, so M = 16 costs about M = 1.
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
    int64_t prefetch_bytes;   // of each W row pulled toward L2 before the wait (multiple of 16; 0: none)
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
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    using P = typename Pair<T>::type;
    const P r = __hadd2(*reinterpret_cast<const P*>(&a), *reinterpret_cast<const P*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// The scale and the (magic + zero) of one row's group, each in both halves of a register.
struct GroupPair {
    uint32_t scale, bias;
};

template <typename T>
__device__ __forceinline__ GroupPair group_pair(uint16_t scale, uint16_t zero) {
    return {splat(scale), add2<T>(splat(zero), Int4Magic<T>::kPair)};  // exact: magic + an integer <= 15
}

// The 4 pairs (k 0-1, 2-3, 4-5, 6-7) of one word as T pairs ((q - z) * s, rounded once).
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

// Scales and zeros are read once per 32 k per row: tiny and shared by the quad, cached.
__device__ __forceinline__ uint16_t load_u16(const void* ptr) {
    uint16_t v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
    return v;
}

template <typename T_, int TOKEN_TILES, int WARPS, int UNROLL, bool SWIGLU, int STAGES>
struct Traits : gemv::CtaShape<T_, TOKEN_TILES, WARPS, UNROLL, SWIGLU> {
    static constexpr int kStages = STAGES;               // 1: W loaded into registers; >= 2: a shared ring
    static constexpr int kLoadK = 32;                    // k in one 16-byte load of packed int4
    static constexpr int kStepK = 4 * kLoadK * UNROLL;   // k one warp covers per step: 4 lanes x 32 x unroll
    static constexpr int kSlots = 2 * (SWIGLU ? 2 : 1) * UNROLL;  // 16-byte W chunks a lane copies a step
    static constexpr bool kRing = STAGES >= 2;           // kStages - 1 steps in flight while one is computed
};

// What one step uses: W (from the ring) with its groups' scales and zeros, and x at the same k.
template <class Tr>
struct WeightStage {
    uint4 w[Tr::kRowTiles][2][Tr::kUnroll];
    uint16_t scale[Tr::kRowTiles][2][Tr::kUnroll], zero[Tr::kRowTiles][2][Tr::kUnroll];
};
template <class Tr>
struct XStage {
    uint4 x[Tr::kTokenTiles][Tr::kUnroll][4];
};

// Where load u of a step starting at k0 reads. CHECK: the step may run past K (the last, partial one); K
// is a multiple of 32, so a load is all in or all out. An out-of-range lane reads its row's first 32 k and
// group (finite weights) and zeroes x. Tokens past M read token 0: an mma column depends only on its own
// token, and those columns are never stored.
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

__device__ __forceinline__ uint4 load_shared(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// W is read once: L1 bypassed, with the 256-byte L2 prefetch of the plain loads (common/stream_load.cuh).
__device__ __forceinline__ void copy_weight(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

// Two ways to stream W. kStages = 1: a step's W loads go straight to registers with its x, all issued before
// its first mma (the warps of an SM overlap each other's loads and dequantization). kStages >= 2: each
// warp streams W through a ring of kStages steps in shared memory (cp.async), so the next kStages - 1 steps
// stay in flight while it dequantizes the current one without holding them in registers (run 4: holding
// one extra step in registers cost more occupancy than it bought). A lane reads back only the 16-byte slots
// it copied itself, so its own cp.async.wait_group is all the ordering the ring needs.
template <class Tr>
struct Cta {
    using T = typename Tr::T;
    const uint4* w[Tr::kRowTiles][2];      // this lane's W rows (g, g + 8) of each tile, at its 32-k offset
    const T* scale[Tr::kRowTiles][2];      // the same rows' groups
    int64_t zero_delta;                    // zeros - scales in elements (symmetric: 0, replaced by 8 after the load)
    const T* x[Tr::kTokenTiles];           // this lane's x token (g, g + 8) at its 32-k offset
    uint32_t ring;                         // shared address of this lane's slot 0 of stage 0
    // Two accumulators per tile (the two k16 halves of a word): an mma waits for the one before it into the
    // same registers, and in-order issue holds the warp's next loads behind the whole chain.
    float acc[Tr::kRowTiles][2 * Tr::kTokenTiles][4];

    static __device__ __forceinline__ int slot(int j, int h, int u) { return (j * 2 + h) * Tr::kUnroll + u; }
    __device__ __forceinline__ uint32_t slot_addr(int stage, int j, int h, int u) const {
        return ring + (stage * Tr::kSlots + slot(j, h, u)) * 32 * 16;
    }

    // Copy step s's W into `stage` of the ring, then close the cp.async group (empty past the last step, so
    // every lane counts the same groups).
    __device__ __forceinline__ void fetch(int s, int steps, int stage, const GemvW4Params& p) const {
        if (s < steps) {
#pragma unroll
            for (int u = 0; u < Tr::kUnroll; ++u) {
                const Chunk c = chunk<Tr, true>(static_cast<int64_t>(s) * Tr::kStepK, u, p);
#pragma unroll
                for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) copy_weight(slot_addr(stage, j, h, u), w[j][h] + c.at);
            }
        }
        attn::cp_async_commit();
    }

    // Before pdl::enter(): W, its scales and zeros are never written by a forward pass, so the CTA starts
    // pulling its rows toward L2 while the kernel before it (a norm, attention) still runs. Lane quad 0 of
    // each row pair: one bulk prefetch of the row's first prefetch_bytes, one line prefetch of its scales
    // and zeros per 128 bytes.
    __device__ __forceinline__ void prefetch_rows(const GemvW4Params& p) const {
        if ((threadIdx.x & 3) || p.prefetch_bytes == 0) return;
        const int64_t row_bytes = p.k / 2, group_bytes = 2 * (p.k >> p.group_shift);
#pragma unroll
        for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                pdl::prefetch_l2_bulk(w[j][h], static_cast<uint32_t>(min(row_bytes, p.prefetch_bytes)));
                for (int64_t b = 0; b < group_bytes; b += 128) {
                    pdl::prefetch_l2(reinterpret_cast<const char*>(scale[j][h]) + b);
                    if (zero_delta) pdl::prefetch_l2(reinterpret_cast<const char*>(scale[j][h] + zero_delta) + b);
                }
            }
    }

    __device__ __forceinline__ void load_stage(int u, const Chunk& c, int stage, WeightStage<Tr>& ws) const {
#pragma unroll
        for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if constexpr (Tr::kRing)
                    ws.w[j][h][u] = load_shared(slot_addr(stage, j, h, u));
                else
                    ws.w[j][h][u] = load_weight(w[j][h] + c.at);
                ws.scale[j][h][u] = load_u16(scale[j][h] + c.group);
                ws.zero[j][h][u] = load_u16(scale[j][h] + zero_delta + c.group);
            }
    }

    __device__ __forceinline__ void load_xs(int u, const Chunk& c, XStage<Tr>& xs) const {
#pragma unroll
        for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) xs.x[t][u][i] = load_x(x[t] + c.x_at + 8 * i);
        if (!c.in) {
#pragma unroll
            for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) xs.x[t][u][i] = make_uint4(0, 0, 0, 0);  // its W products vanish
        }
    }

    __device__ __forceinline__ void compute(const WeightStage<Tr>& ws, const XStage<Tr>& xs, bool symmetric) {
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < Tr::kRowTiles; ++j) {
                GroupPair gp[2];
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    gp[h] = group_pair<T>(ws.scale[j][h][u], symmetric ? Int4Magic<T>::kEight : ws.zero[j][h][u]);
#pragma unroll
                for (int word = 0; word < 4; ++word) {
                    uint32_t lo[4], hi[4];  // rows g and g + 8, k 8 word + 0..7 of this lane's 32
                    dequant_word<T>((&ws.w[j][0][u].x)[word], gp[0], lo);
                    dequant_word<T>((&ws.w[j][1][u].x)[word], gp[1], hi);
                    const uint32_t a_lo[4] = {lo[0], hi[0], lo[1], hi[1]}, a_hi[4] = {lo[2], hi[2], lo[3], hi[3]};
#pragma unroll
                    for (int t = 0; t < Tr::kTokenTiles; ++t) {
                        const uint4& xw = xs.x[t][u][word];  // token g, the same 8 k
                        attn::MmaOp<T>::run(acc[j][2 * t], a_lo, xw.x, xw.y);
                        attn::MmaOp<T>::run(acc[j][2 * t + 1], a_hi, xw.z, xw.w);
                    }
                }
            }
    }

    // One step starting at k0 whose W sits in `stage`: its x, scales, zeros and W, then its mmas.
    // __syncwarp between them: ptxas otherwise interleaves them (csrc/gemv.cu).
    template <bool CHECK>
    __device__ __forceinline__ void step(int64_t k0, int stage, const GemvW4Params& p) {
        WeightStage<Tr> ws;
        XStage<Tr> xs;
#pragma unroll
        for (int u = 0; u < Tr::kUnroll; ++u) {
            const Chunk c = chunk<Tr, CHECK>(k0, u, p);
            load_stage(u, c, stage, ws);
            load_xs(u, c, xs);
        }
        __syncwarp();
        compute(ws, xs, p.zeros == nullptr);
    }
};

template <class Tr>
__device__ __forceinline__ void gemv_w4_cta(const GemvW4Params& p) {
    using T = typename Tr::T;
    __shared__ float partial[Tr::kWarps][Tr::kFragments];
    extern __shared__ __align__(16) uint4 ring[];  // [kWarps][kStages][kSlots][32 lanes] 16-byte slots
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
#pragma unroll
    for (int t = 0; t < Tr::kTokenTiles; ++t) {
        const int token = g + 8 * t;
        cta.x[t] = static_cast<const T*>(p.x) + (token < p.m ? token : 0) * p.x_stride + Tr::kLoadK * quad;
    }
    cta.zero_delta = p.zeros ? static_cast<const T*>(p.zeros) - static_cast<const T*>(p.scales) : 0;
    cta.ring = attn::smem_address(ring + (warp * Tr::kStages * Tr::kSlots) * 32 + lane);
    attn::zero_fragments(cta.acc);

    cta.prefetch_rows(p);
    pdl::enter();

    // Warps take steps round-robin, so at any moment a CTA streams kWarps adjacent steps of each row.
    // Only the last step can be partial (K % kStepK); its loads check K.
    const int steps = static_cast<int>((p.k + Tr::kStepK - 1) / Tr::kStepK);
    const int full_steps = static_cast<int>(p.k / Tr::kStepK);
    if constexpr (!Tr::kRing) {
        for (int s = warp; s < full_steps; s += Tr::kWarps) cta.template step<false>(static_cast<int64_t>(s) * Tr::kStepK, 0, p);
        if (steps > full_steps && full_steps % Tr::kWarps == warp)
            cta.template step<true>(static_cast<int64_t>(full_steps) * Tr::kStepK, 0, p);
    } else {
        int ahead = warp;
#pragma unroll
        for (int i = 0; i < Tr::kStages - 1; ++i, ahead += Tr::kWarps) cta.fetch(ahead, steps, i, p);
        int stage = 0, ahead_stage = Tr::kStages - 1;
        for (int s = warp; s < steps; s += Tr::kWarps) {
            cta.fetch(ahead, steps, ahead_stage, p);  // into the slot the previous step freed
            ahead += Tr::kWarps;
            ahead_stage = ahead_stage + 1 == Tr::kStages ? 0 : ahead_stage + 1;
            attn::cp_async_wait<Tr::kStages - 1>();   // this lane's copies of step s have landed
            if (s < full_steps)
                cta.template step<false>(static_cast<int64_t>(s) * Tr::kStepK, stage, p);
            else
                cta.template step<true>(static_cast<int64_t>(s) * Tr::kStepK, stage, p);
            stage = stage + 1 == Tr::kStages ? 0 : stage + 1;
        }
        attn::cp_async_wait<0>();  // no copy may outlive the CTA's shared memory
    }

#pragma unroll
    for (int j = 0; j < Tr::kRowTiles; ++j)
#pragma unroll
        for (int t = 0; t < Tr::kTokenTiles; ++t)
#pragma unroll
            for (int c = 0; c < 4; ++c)
                partial[warp][((j * Tr::kTokenTiles + t) * 32 + lane) * 4 + c] =
                    cta.acc[j][2 * t][c] + cta.acc[j][2 * t + 1][c];
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

// Instantiations: gemv_w4_<linear|swiglu>_<dtype>_m<8|16>_w<warps>_u<loads a step>_b<min CTAs an SM>_s<ring stages>,
// the table fusedops/ops/gemm_w4.py TUNINGS. The min-CTA bound sets ptxas' register cap; with the ring
// (warps x stages x loads a step x 512 bytes of dynamic shared memory) it must also fit the SM's 227 KB.
#define FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, KIND, IS_SWIGLU, TILES, MAXM, W, U, B, S)                           \
    extern "C" __global__ void __launch_bounds__(32 * W, B)                                                   \
        gemv_w4_##KIND##_##SUFFIX##_m##MAXM##_w##W##_u##U##_b##B##_s##S(const __grid_constant__ GemvW4Params p) { \
        fusedops::gemv_w4::gemv_w4_cta<fusedops::gemv_w4::Traits<T, TILES, W, U, IS_SWIGLU, S>>(p);           \
    }
#define FUSEDOPS_GEMV_W4_DTYPE(T, SUFFIX)                                                                     \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 2, 2, 1)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 4, 4, 3, 1)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 2, 2, 4)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 2, 2, 3)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 4, 4, 3, 3)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 8, 1, 4, 4)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 1, 8, 16, 1, 2, 3)                                  \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 8, 1, 2, 1)                                  \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 8, 1, 3, 4)                                  \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 4, 2, 3, 3)                                  \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, linear, false, 2, 16, 8, 1, 2, 4)                                  \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 8, 1, 2, 3)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 8, 1, 3, 4)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 4, 2, 4, 1)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 4, 2, 3, 3)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 1, 8, 4, 1, 4, 4)                                    \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 8, 1, 2, 1)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 8, 1, 2, 4)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 4, 2, 2, 3)                                   \
    FUSEDOPS_GEMV_W4_KERNEL(T, SUFFIX, swiglu, true, 2, 16, 4, 1, 3, 4)                                   \
    extern "C" __global__ void __launch_bounds__(256) dequant_w4_##SUFFIX(const __grid_constant__ DequantW4Params p) { \
        fusedops::pdl::enter();                                                                                        \
        fusedops::gemv_w4::dequant_w4<T>(p);                                                                  \
    }

FUSEDOPS_GEMV_W4_DTYPE(__nv_bfloat16, bf16)
FUSEDOPS_GEMV_W4_DTYPE(__half, fp16)
