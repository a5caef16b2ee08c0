// FlashAttention-2-style forward pass: O = softmax(scale * Q K^T + mask) V, GQA-native.
//
// One CTA per (query tile, q head, batch). The Q tile stays in shared memory; K/V tiles stream
// through a 2-stage cp.async ring (K and V in separate commit groups, so Q K^T starts while V lands),
// all tiles XOR-swizzled for conflict-free ldmatrix. S = Q K^T and O += P V run on mma.sync m16n8k16
// with fp32 accumulators; the softmax is online, in fp32, with exp2. Key tiles are visited from the
// last to the first, so the (few) tiles that need masking come first; tiles wholly above the causal
// diagonal or past kv_len are never loaded. O is written once, through shared memory, as 16-byte rows.
//
// The variant (head dim, tile sizes, warps) comes from -D flags set by the Python table
// PREFILL_TILES in fusedops/ops/attention.py: one cubin per variant, bf16 and fp16 kernels in each.
#include "attention/mma_sm80.cuh"
#include "attention/online_softmax.cuh"
#include "attention/prefill_params.cuh"
#include "attention/prefill_traits.cuh"

namespace fusedops::attn {

// Rows [row0, row0 + kRows) of a [rows, D] matrix (row stride in elements) into a swizzled tile;
// rows at or past rows_valid are zero-filled (no global read).
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile(uint32_t tile, const typename Tr::T* base, int64_t row_stride,
                                          int row0, int rows_valid) {
    constexpr int kRowsPerPass = Tr::kThreads / Tr::kChunks;
    const int r = threadIdx.x / Tr::kChunks, c = threadIdx.x % Tr::kChunks;
    const typename Tr::T* src = base + (row0 + r) * row_stride + c * 8;
#pragma unroll
    for (int i = 0; i < kRows / kRowsPerPass; ++i) {
        const bool valid = row0 + r + i * kRowsPerPass < rows_valid;
        cp_async_16(tile + swizzled_offset<Tr::kChunks>(r + i * kRowsPerPass, c),
                    valid ? src + i * kRowsPerPass * row_stride : base, valid);
    }
}

// ldmatrix addresses with two registers per operand: a fragment's rows differ from the lane's row by
// multiples of 8 (row % 8 = lane % 8 fixed), and for chunk 2 pair + lo (lo in {0, 1}),
// (2 pair + lo) ^ r = (2 pair ^ (r & 6)) + ((lo ^ r) & 1); so offset = base + ((32 pair) ^ hi) with
// base and hi = 16 (r & 6) per lane, and the pair / row steps as immediates.
template <class Tr>
struct FragmentOffsets {
    uint32_t base, hi;
    __device__ __forceinline__ FragmentOffsets(int row, int chunk_lo) {
        const int r = row & 7;
        base = (row * Tr::kChunks + ((chunk_lo ^ r) & 1)) * 16;
        hi = (r & 6) * 16;
    }
    // Byte offset of chunk pair `pair` (chunks 2 pair + {0, 1}) in the row `rows_down` below the lane's.
    __device__ __forceinline__ uint32_t at(int rows_down, int pair) const {
        return base + ((pair * 32) ^ hi) + rows_down * Tr::kChunks * 16;
    }
};

// s[mi][ni] += Q[warp rows] K[tile]^T over the whole head dim.
template <class Tr>
__device__ __forceinline__ void gemm_qk(float (&s)[Tr::kMTiles][Tr::kNTiles][4], uint32_t sq, uint32_t sk,
                                        const FragmentOffsets<Tr>& q_frag, const FragmentOffsets<Tr>& k_frag) {
#pragma unroll
    for (int kk = 0; kk < Tr::kHeadDim / 16; ++kk) {
        uint32_t a[Tr::kMTiles][4];
#pragma unroll
        for (int mi = 0; mi < Tr::kMTiles; ++mi) ldmatrix_x4(a[mi], sq + q_frag.at(mi * 16, kk));
#pragma unroll
        for (int nj = 0; nj < Tr::kNTiles / 2; ++nj) {
            uint32_t b[4];  // two n8 tiles of keys: b[0..1] keys 0-7, b[2..3] keys 8-15
            ldmatrix_x4(b, sk + k_frag.at(nj * 16, kk));
#pragma unroll
            for (int mi = 0; mi < Tr::kMTiles; ++mi) {
                MmaOp<typename Tr::T>::run(s[mi][2 * nj], a[mi], b[0], b[1]);
                MmaOp<typename Tr::T>::run(s[mi][2 * nj + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

// o[mi][di] += P V[tile].
template <class Tr>
__device__ __forceinline__ void gemm_pv(float (&o)[Tr::kMTiles][Tr::kDTiles][4],
                                        const uint32_t (&pa)[Tr::kMTiles][Tr::kBlockN / 16][4], uint32_t sv,
                                        const FragmentOffsets<Tr>& v_frag) {
#pragma unroll
    for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
#pragma unroll
        for (int dj = 0; dj < Tr::kDTiles / 2; ++dj) {
            uint32_t b[4];  // keys kk*16..+15 x two d8 tiles, transposed into B fragments
            ldmatrix_x4_trans(b, sv + v_frag.at(kk * 16, dj));
#pragma unroll
            for (int mi = 0; mi < Tr::kMTiles; ++mi) {
                MmaOp<typename Tr::T>::run(o[mi][2 * dj], pa[mi][kk], b[0], b[1]);
                MmaOp<typename Tr::T>::run(o[mi][2 * dj + 1], pa[mi][kk], b[2], b[3]);
            }
        }
    }
}

// What one CTA sees of its (batch, head): lengths and the causal offset of its sequence.
struct Span {
    int key_end;       // keys >= key_end are invisible (Skv, clipped by kv_len)
    int causal_shift;  // query i sees key j <= i + causal_shift (kv_len or Skv, minus S)
};

__device__ __forceinline__ Span make_span(const AttentionPrefillParams& p, int batch, int seqlen_q, int seqlen_k) {
    int64_t length = seqlen_k;
    if (p.kv_len != nullptr) {
        const int64_t i = batch * p.kv_len_stride;
        length = p.kv_len_is_int64 ? static_cast<const int64_t*>(p.kv_len)[i]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(p.kv_len)[i]);
    }
    // Clamped to [-1, Skv + S] the visible set is unchanged, and every index fits in 32 bits.
    const int64_t upper = static_cast<int64_t>(seqlen_k) + seqlen_q;
    const int clamped = static_cast<int>(length < -1 ? -1 : (length > upper ? upper : length));
    return {clamped < 0 ? 0 : min(clamped, seqlen_k), clamped - seqlen_q};
}

template <int kM, int kN>
__device__ __forceinline__ void clear(float (&s)[kM][kN][4]) {
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int ni = 0; ni < kN; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mi][ni][e] = 0.f;
}

template <int kM, int kN>
__device__ __forceinline__ void copy(float (&dst)[kM][kN][4], const float (&src)[kM][kN][4]) {
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int ni = 0; ni < kN; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[mi][ni][e] = src[mi][ni][e];
}

// -inf where a key is invisible: past key_end, above the causal diagonal, or masked off.
// row0: the warp's first query row; n0: the tile's first key. The mask pointer is formed here, off
// the hot path, so it holds no registers across the main loop.
template <class Tr>
__device__ __forceinline__ void mask_tile(float (&s)[Tr::kMTiles][Tr::kNTiles][4], const AttentionPrefillParams& p,
                                          const Span& span, int batch, int head, int row0, int n0, int seqlen_q,
                                          int lane) {
    const uint8_t* mask = p.mask == nullptr ? nullptr : p.mask + batch * p.mask_batch + head * p.mask_head;
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + mi * 16 + (lane >> 2) + 8 * h;
            const int causal_end = row + span.causal_shift;  // last visible key
#pragma unroll
            for (int ni = 0; ni < Tr::kNTiles; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = n0 + ni * 8 + 2 * (lane & 3) + e;
                    bool visible = col < span.key_end && row < seqlen_q;
                    if (p.is_causal) visible = visible && col <= causal_end;
                    if (mask != nullptr && visible) visible = mask[row * p.mask_row + col * p.mask_col] != 0;
                    if (!visible) s[mi][ni][2 * h + e] = -INFINITY;
                }
        }
}

template <class Tr>
__device__ __forceinline__ void prefill_attention(const AttentionPrefillParams& p) {
    using T = typename Tr::T;
    constexpr int kMTiles = Tr::kMTiles, kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;
    extern __shared__ __align__(128) uint8_t smem[];

    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first: a shorter tail
    const int head = blockIdx.y, batch = blockIdx.z;
    const int kv_head = head / p.group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_row0 = warp * Tr::kRowsPerWarp;

    int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
    int q_start = 0, k_start = 0;  // first row of this sequence (varlen packing: int32 offsets)
    if (p.cu_seqlens_q != nullptr) {
        q_start = p.cu_seqlens_q[batch];
        k_start = p.cu_seqlens_k[batch];
        seqlen_q = p.cu_seqlens_q[batch + 1] - q_start;
        seqlen_k = p.cu_seqlens_k[batch + 1] - k_start;
    }
    const int m0 = m_block * Tr::kBlockM;
    if (m0 >= seqlen_q) return;
    const Span span = make_span(p, batch, seqlen_q, seqlen_k);

    // Key tiles this query tile can see at all.
    const int key_stop = p.is_causal ? min(span.key_end, m0 + Tr::kBlockM + span.causal_shift) : span.key_end;
    const int n_blocks = key_stop <= 0 ? 0 : (key_stop + Tr::kBlockN - 1) / Tr::kBlockN;

    const T* q = static_cast<const T*>(p.q) + batch * p.q_batch + head * p.q_head + (q_start + m0) * p.q_row;
    const T* k = static_cast<const T*>(p.k) + batch * p.k_batch + kv_head * p.k_head + k_start * p.k_row;
    const T* v = static_cast<const T*>(p.v) + batch * p.v_batch + kv_head * p.v_head + k_start * p.v_row;

    const uint32_t sq = smem_address(smem);
    auto sk = [&](int stage) { return sq + Tr::kTileQBytes + stage * Tr::kStageBytes; };
    auto sv = [&](int stage) { return sk(stage) + Tr::kTileKVBytes; };

    // Per-lane ldmatrix rows: Q (A operand), K (B, keys as rows), V (B via .trans, keys as rows).
    const FragmentOffsets<Tr> q_frag(warp_row0 + (lane & 15), lane >> 4);
    const FragmentOffsets<Tr> k_frag((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    const FragmentOffsets<Tr> v_frag((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);

    float o[kMTiles][kDTiles][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
        for (int di = 0; di < kDTiles; ++di)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][di][e] = 0.f;
    OnlineSoftmax<kMTiles, kNTiles, kDTiles> softmax;

    // Pipeline: K_j lives in stage j % 2 of the K ring, V_j in stage j % 2 of the V ring. Iteration j
    // issues S_{j+1} = Q K_{j+1}^T on the tensor cores first, then runs the softmax of S_j (no
    // dependence on those mmas, so the two overlap within each warp), then O += P_j V_j; the copies
    // of K_{j+2} and V_{j+1} fly meanwhile. One barrier per key tile.
    float s[kMTiles][kNTiles][4];
    if (n_blocks > 0) {
        load_tile<Tr, Tr::kBlockM>(sq, q, p.q_row, 0, seqlen_q - m0);
        load_tile<Tr, Tr::kBlockN>(sk(0), k, p.k_row, (n_blocks - 1) * Tr::kBlockN, span.key_end);
        cp_async_commit();
        if (n_blocks > 1) load_tile<Tr, Tr::kBlockN>(sk(1), k, p.k_row, (n_blocks - 2) * Tr::kBlockN, span.key_end);
        load_tile<Tr, Tr::kBlockN>(sv(0), v, p.v_row, (n_blocks - 1) * Tr::kBlockN, span.key_end);
        cp_async_commit();
        cp_async_wait<1>();  // Q and K_0
        __syncthreads();
        clear(s);
        gemm_qk<Tr>(s, sq, sk(0), q_frag, k_frag);
    }

    for (int j = 0; j < n_blocks; ++j) {
        const int n_block = n_blocks - 1 - j, stage = j & 1;
        const int n0 = n_block * Tr::kBlockN;
        cp_async_wait<0>();  // K_{j+1} and V_j landed
        __syncthreads();     // ... for every thread; every warp is done with K_j and V_{j-1}
        if (n_block >= 2) load_tile<Tr, Tr::kBlockN>(sk(stage), k, p.k_row, n0 - 2 * Tr::kBlockN, span.key_end);
        if (n_block >= 1) load_tile<Tr, Tr::kBlockN>(sv(stage ^ 1), v, p.v_row, n0 - Tr::kBlockN, span.key_end);
        cp_async_commit();

        float s_next[kMTiles][kNTiles][4];
        clear(s_next);
        if (n_block >= 1) gemm_qk<Tr>(s_next, sq, sk(stage ^ 1), q_frag, k_frag);

        const bool partial = n0 + Tr::kBlockN > span.key_end ||
                             (p.is_causal && n0 + Tr::kBlockN - 1 > m0 + span.causal_shift);
        if (partial || p.mask != nullptr) mask_tile<Tr>(s, p, span, batch, head, m0 + warp_row0, n0, seqlen_q, lane);
        uint32_t pa[kMTiles][Tr::kBlockN / 16][4];
        softmax.template update<T>(s, o, pa, p.scale_log2);
        gemm_pv<Tr>(o, pa, sv(stage), v_frag);
        copy(s, s_next);
    }

    // Epilogue: normalize, stage O through the (now free) Q tile, write 16-byte rows.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float sum = quad_sum(softmax.row_sum[mi][h]);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key -> zeros
            const int local_row = warp_row0 + mi * 16 + (lane >> 2) + 8 * h;
            if (p.lse != nullptr && (lane & 3) == 0 && m0 + local_row < seqlen_q) {
                float* lse = p.lse + batch * p.lse_batch + head * p.lse_head + q_start + m0 + local_row;
                *lse = sum > 0.f ? softmax.row_max[mi][h] * p.scale + logf(sum) : -INFINITY;
            }
#pragma unroll
            for (int di = 0; di < kDTiles; ++di) {
                const uint32_t packed = pack2<T>(o[mi][di][2 * h] * inv, o[mi][di][2 * h + 1] * inv);
                const uint32_t addr = sq + swizzled_offset<Tr::kChunks>(local_row, di) + 4 * (lane & 3);
                asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(packed));
            }
        }
    __syncthreads();
    T* out = static_cast<T*>(p.out) + batch * p.o_batch + head * p.o_head + (q_start + m0) * p.o_row;
    constexpr int kPerThread = Tr::kBlockM * Tr::kChunks / Tr::kThreads;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const int idx = threadIdx.x + i * Tr::kThreads;
        const int r = idx / Tr::kChunks, c = idx % Tr::kChunks;
        if (m0 + r < seqlen_q) {
            uint4 chunk;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(chunk.x), "=r"(chunk.y), "=r"(chunk.z), "=r"(chunk.w)
                         : "r"(sq + swizzled_offset<Tr::kChunks>(r, c)));
            *reinterpret_cast<uint4*>(out + r * p.o_row + c * 8) = chunk;
        }
    }
}

}  // namespace fusedops::attn

#if !defined(FA_HEAD_DIM) || !defined(FA_BLOCK_M) || !defined(FA_BLOCK_N) || !defined(FA_WARPS) || \
    !defined(FA_MIN_BLOCKS)
#error "attention_prefill.cu is built per variant: -DFA_HEAD_DIM -DFA_BLOCK_M -DFA_BLOCK_N -DFA_WARPS -DFA_MIN_BLOCKS"
#endif

#define FUSEDOPS_PREFILL_KERNEL(T, NAME)                                                              \
    using PrefillTraits_##NAME =                                                                      \
        fusedops::attn::PrefillTraits<T, FA_HEAD_DIM, FA_BLOCK_M, FA_BLOCK_N, FA_WARPS, 2>;           \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32, FA_MIN_BLOCKS)                        \
        attention_prefill_##NAME(const __grid_constant__ AttentionPrefillParams p) {                 \
        fusedops::attn::prefill_attention<PrefillTraits_##NAME>(p);                                   \
    }

FUSEDOPS_PREFILL_KERNEL(__nv_bfloat16, bf16)
FUSEDOPS_PREFILL_KERNEL(__half, fp16)
