// FlashAttention-2-style forward pass: O = softmax(scale * Q K^T + mask) V, GQA-native.
//
// One CTA per (query tile, q head, batch). The Q tile stays in shared memory; K/V tiles stream
// through a 2-stage cp.async ring (K and V in separate commit groups, so Q K^T starts while V lands),
// all tiles XOR-swizzled for conflict-free ldmatrix. S = Q K^T and O += P V run on mma.sync m16n8k16
// with fp32 accumulators; the softmax is online, in fp32, with exp2. Key tiles are visited from the
// last to the first, so the (few) tiles that need masking come first; tiles wholly above the causal
// diagonal or past kv_len are never loaded. A boolean mask comes with its block map
// (attention_mask_blocks.cu): tiles it shows all masked are never loaded either, tiles it shows all
// visible run unmasked, and only mixed tiles read the mask. O is written once, through shared memory,
// as 16-byte rows.
//
// The variant (head dim, tile sizes, warps) comes from -D flags set by the Python table
// PREFILL_TILES in fusedops/ops/attention.py: one cubin per variant, bf16 and fp16 kernels in each.
#include "common/pdl.cuh"
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

// ldmatrix addresses without a register per (row, chunk) pair: a fragment's rows differ from the
// lane's row by multiples of 8 (row % 8 fixed), and chunk (4j + i) ^ (row % 8) = 8 (j / 2) + ((2i + lo) ^
// (row % 8)) for lo in {0, 1}; so 4 per-lane offsets plus compile-time constants cover the tile.
template <class Tr>
struct FragmentOffsets {
    uint32_t off[4];
    __device__ __forceinline__ FragmentOffsets(int row, int chunk_lo) {
#pragma unroll
        for (int i = 0; i < 4; ++i) off[i] = swizzled_offset<Tr::kChunks>(row, 2 * i + chunk_lo);
    }
    // Byte offset of chunk pair `pair` (chunks 2 pair + {0, 1}) in the row `rows_down` below the lane's.
    __device__ __forceinline__ uint32_t at(int rows_down, int pair) const {
        return off[pair % 4] + (pair / 4) * 128 + rows_down * Tr::kChunks * 16;
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

// P as mma A fragments, straight from the S accumulators (the C layout of two n8 tiles is the A
// layout of one k16 step), rounded to T.
template <class Tr>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[Tr::kMTiles][Tr::kBlockN / 16][4],
                                       const float (&p)[Tr::kMTiles][Tr::kNTiles][4]) {
    using T = typename Tr::T;
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
        for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
            pa[mi][kk][0] = pack2<T>(p[mi][2 * kk][0], p[mi][2 * kk][1]);
            pa[mi][kk][1] = pack2<T>(p[mi][2 * kk][2], p[mi][2 * kk][3]);
            pa[mi][kk][2] = pack2<T>(p[mi][2 * kk + 1][0], p[mi][2 * kk + 1][1]);
            pa[mi][kk][3] = pack2<T>(p[mi][2 * kk + 1][2], p[mi][2 * kk + 1][3]);
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
    int seqlen_q;
    int key_end;         // keys >= key_end are invisible (Skv, clipped by kv_len)
    int causal_shift;    // query i sees key j <= i + causal_shift (kv_len or Skv, minus S)
};

__device__ __forceinline__ Span make_span(const AttentionPrefillParams& p, int batch, int seqlen_q, int seqlen_k) {
    int64_t length = seqlen_k;
    if (p.kv_len != nullptr) {
        const int64_t i = batch * p.kv_len_stride;
        length = p.kv_len_is_int64 ? static_cast<const int64_t*>(p.kv_len)[i]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(p.kv_len)[i]);
    }
    Span span;
    span.seqlen_q = seqlen_q;
    span.key_end = static_cast<int>(length < 0 ? 0 : (length < seqlen_k ? length : seqlen_k));
    const int64_t bound = int64_t{1} << 30;  // int, not int64: one register fewer (the kernel is at the cap)
    span.causal_shift = static_cast<int>(length < -bound ? -bound : (length > bound ? bound : length)) - seqlen_q;
    return span;
}

// The key tiles one CTA visits, from the last to the first. Without a mask: every tile below the
// start. With one: those whose block-map cells hold a visible key. Lane i of a warp classifies tile
// top - i, and the ballot keeps 32 tiles in one register, so the map is read once per 32 tiles
// (coalesced) and every warp walks the same tiles. Registers are at the 255 cap: the map address is
// rebuilt from the params when needed (masks come without varlen, so blockIdx is (batch, head)).
template <class Tr>
struct KeyTileWalk {
    static constexpr int kCellRows = Tr::kBlockM / kMaskCellRows, kCellCols = Tr::kBlockN / kMaskCellKeys;
    static_assert(kCellRows >= 1 && Tr::kBlockM % kMaskCellRows == 0 && Tr::kBlockN % kMaskCellKeys == 0,
                  "a tile covers whole block-map cells");
    int top = -1;       // tile of lane 0 in `live`
    uint32_t live = 0;  // bit i: tile top - i is still to be visited

    // OR of the map cells under key tile `tile` of the query tile at m0 (mask present, not varlen).
    static __device__ __forceinline__ uint32_t flags(const AttentionPrefillParams& p, int m0, int tile) {
        const uint8_t* cells = p.mask_blocks + blockIdx.z * p.blocks_batch + blockIdx.y * p.blocks_head +
                               (m0 / kMaskCellRows) * p.blocks_row;
        uint32_t f = 0;
#pragma unroll
        for (int r = 0; r < kCellRows; ++r)
#pragma unroll
            for (int c = 0; c < kCellCols; ++c) {
                const int col = tile * kCellCols + c;  // cells past the last row / key do not exist
                if (m0 + r * kMaskCellRows < p.seqlen_q && col * kMaskCellKeys < p.seqlen_k)
                    f |= __ldg(cells + r * p.blocks_row + col * p.blocks_col);
            }
        return f;
    }

    __device__ __forceinline__ void classify(const AttentionPrefillParams& p, int m0, int new_top) {
        top = new_top;
        const int tile = top - static_cast<int>(threadIdx.x & 31);
        const bool visible = tile >= 0 && (p.mask == nullptr || (flags(p, m0, tile) & kSomeVisible));
        live = __ballot_sync(0xffffffffu, visible);
    }

    // The next tile to visit, -1 when none is left.
    __device__ __forceinline__ int next(const AttentionPrefillParams& p, int m0) {
        while (live == 0) {
            if (top < 32) return -1;
            classify(p, m0, top - 32);
        }
        const int i = __ffs(live) - 1;
        live &= live - 1;
        return top - i;
    }
};

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
    int64_t q_start = 0, k_start = 0;  // first row of this sequence (varlen packing)
    if (p.cu_seqlens_q != nullptr) {
        q_start = p.cu_seqlens_q[batch];
        k_start = p.cu_seqlens_k[batch];
        seqlen_q = p.cu_seqlens_q[batch + 1] - static_cast<int>(q_start);
        seqlen_k = p.cu_seqlens_k[batch + 1] - static_cast<int>(k_start);
    }
    const int m0 = m_block * Tr::kBlockM;
    if (m0 >= seqlen_q) return;
    const Span span = make_span(p, batch, seqlen_q, seqlen_k);

    // Key tiles this query tile can see at all.
    int64_t key_stop = span.key_end;
    if (p.is_causal) key_stop = min(key_stop, static_cast<int64_t>(m0 + Tr::kBlockM + span.causal_shift));
    const int n_blocks = key_stop <= 0 ? 0 : static_cast<int>((key_stop + Tr::kBlockN - 1) / Tr::kBlockN);

    const T* q = static_cast<const T*>(p.q) + batch * p.q_batch + head * p.q_head + (q_start + m0) * p.q_row;
    const T* k = static_cast<const T*>(p.k) + batch * p.k_batch + kv_head * p.k_head + k_start * p.k_row;
    const T* v = static_cast<const T*>(p.v) + batch * p.v_batch + kv_head * p.v_head + k_start * p.v_row;
    KeyTileWalk<Tr> walk;
    if (n_blocks > 0) walk.classify(p, m0, n_blocks - 1);
    int n_block = walk.next(p, m0);

    const uint32_t sq = smem_address(smem);
    auto sk = [&](int stage) { return sq + Tr::kTileQBytes + stage * Tr::kStageBytes; };
    auto sv = [&](int stage) { return sk(stage) + Tr::kTileKVBytes; };

    // Per-lane ldmatrix rows: Q (A operand), K (B, keys as rows), V (B via .trans, keys as rows).
    const FragmentOffsets<Tr> q_frag(warp_row0 + (lane & 15), lane >> 4);
    const FragmentOffsets<Tr> k_frag((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    const FragmentOffsets<Tr> v_frag((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);

    float o[kMTiles][kDTiles][4];
    zero_fragments(o);
    OnlineSoftmax<kMTiles, kNTiles, kDTiles> softmax;

    if (n_block >= 0) {
        load_tile<Tr, Tr::kBlockM>(sq, q, p.q_row, 0, seqlen_q - m0);
        load_tile<Tr, Tr::kBlockN>(sk(0), k, p.k_row, n_block * Tr::kBlockN, span.key_end);
        cp_async_commit();
        load_tile<Tr, Tr::kBlockN>(sv(0), v, p.v_row, n_block * Tr::kBlockN, span.key_end);
        cp_async_commit();
    }

    for (int stage = 0; n_block >= 0; stage ^= 1) {
        const int n0 = n_block * Tr::kBlockN;
        const int next_block = walk.next(p, m0);
        __syncthreads();  // every warp is done with the other stage (read in the previous iteration)
        if (next_block >= 0)
            load_tile<Tr, Tr::kBlockN>(sk(stage ^ 1), k, p.k_row, next_block * Tr::kBlockN, span.key_end);
        cp_async_commit();
        if (next_block >= 0)
            load_tile<Tr, Tr::kBlockN>(sv(stage ^ 1), v, p.v_row, next_block * Tr::kBlockN, span.key_end);
        cp_async_commit();
        cp_async_wait<3>();  // this stage's K (and Q) landed; V and the next tile may still fly
        __syncthreads();

        float s[kMTiles][kNTiles][4];
        zero_fragments(s);
        gemm_qk<Tr>(s, sq, sk(stage), q_frag, k_frag);

        // Only tiles whose cells also hold a masked key read the mask.
        const bool mixed = p.mask != nullptr && (KeyTileWalk<Tr>::flags(p, m0, n_block) & kSomeMasked);
        const bool partial = n0 + Tr::kBlockN > span.key_end ||
                             (p.is_causal && n0 + Tr::kBlockN - 1 > m0 + span.causal_shift);
        if (partial || mixed) {
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m0 + warp_row0 + mi * 16 + (lane >> 2) + 8 * h;
                    const int causal_end = row + span.causal_shift;  // last visible key
                    const uint8_t* mask_row = p.mask + batch * p.mask_batch + head * p.mask_head + row * p.mask_row;
#pragma unroll
                    for (int ni = 0; ni < kNTiles; ++ni) {
                        const int col = n0 + ni * 8 + 2 * (lane & 3);  // this lane's two keys: col, col + 1
                        bool visible[2];
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            visible[e] = col + e < span.key_end && row < seqlen_q;
                            if (p.is_causal) visible[e] = visible[e] && col + e <= causal_end;
                        }
                        if (mixed && p.mask_pairs && (visible[0] || visible[1])) {  // col + 1 < Skv (Skv even)
                            const uint32_t pair = __ldg(reinterpret_cast<const uint16_t*>(mask_row + col));
                            visible[0] = visible[0] && (pair & 0xffu) != 0;
                            visible[1] = visible[1] && (pair >> 8) != 0;
                        } else if (mixed) {
#pragma unroll
                            for (int e = 0; e < 2; ++e)
                                if (visible[e]) visible[e] = mask_row[(col + e) * p.mask_col] != 0;
                        }
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            if (!visible[e]) s[mi][ni][2 * h + e] = -INFINITY;
                    }
                }
        }
        softmax.update(s, o, p.scale_log2);
        uint32_t pa[kMTiles][Tr::kBlockN / 16][4];
        pack_p<Tr>(pa, s);

        cp_async_wait<2>();  // this stage's V landed
        __syncthreads();
        gemm_pv<Tr>(o, pa, sv(stage), v_frag);
        n_block = next_block;
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
        fusedops::pdl::enter();                                                                      \
        fusedops::attn::prefill_attention<PrefillTraits_##NAME>(p);                                   \
    }

FUSEDOPS_PREFILL_KERNEL(__nv_bfloat16, bf16)
FUSEDOPS_PREFILL_KERNEL(__half, fp16)
