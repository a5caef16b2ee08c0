// Split-KV flash-decoding over a static KV cache, GQA-native.
//
// attn_decode_*: grid (num_splits, Hkv, B). One CTA loads K/V of one kv head once (cp.async, 16-byte
// chunks, XOR-swizzled multi-stage pipeline) for all group*S query rows that share it, computes
// S = QKᵀ and O += PV with mma.sync m16n8k16 (fp32 accumulators) and an exp2 online softmax. The valid
// length comes from kv_len[b] on the device; CTAs past it exit. With one split the CTA writes the
// output; otherwise it writes a normalized fp32 partial and its log-sum-exp, and the splits that had keys
// are merged: by the last of them to finish (p.semaphores: one arrival counter per (batch, kv head)), or,
// without semaphores, by attn_decode_combine_* launched after it. Merging in the split kernel saves a
// launch per layer of a decode step (perf/notes/attention.md).
#include "common/pdl.cuh"
#include "attention/mma_sm80.cuh"
#include "attention_decode_params.cuh"
#include "common/reduce.cuh"

namespace fusedops::decode {

using attn::cp_async_16;
using attn::fast_exp2;
using attn::smem_address;

template <class Tr>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
    return attn::swizzled_offset<Tr::kChunks>(row, chunk);
}

// One 64-key tile of K and V into a pipeline stage; keys at or past `end` are zero-filled.
template <class Tr>
__device__ __forceinline__ void load_kv_tile(const DecodeParams& p, const typename Tr::Element* k_head,
                                             const typename Tr::Element* v_head, int key0, int end,
                                             uint32_t k_stage, uint32_t v_stage) {
    constexpr int kPerThread = Tr::kTileKeys * Tr::kChunks / Tr::kThreads;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const int idx = threadIdx.x + i * Tr::kThreads;
        const int row = idx / Tr::kChunks, chunk = idx % Tr::kChunks;
        const int key = key0 + row;
        const bool valid = key < end;
        const int64_t safe_key = valid ? key : 0;
        cp_async_16(k_stage + tile_offset<Tr>(row, chunk), k_head + safe_key * p.k_stride_l + chunk * 8, valid);
        cp_async_16(v_stage + tile_offset<Tr>(row, chunk), v_head + safe_key * p.v_stride_l + chunk * 8, valid);
    }
}

// The query rows of kv head `kvh` (row r = head-in-group * S + token) into shared memory, zero-padded.
template <class Tr>
__device__ __forceinline__ void load_q(const DecodeParams& p, int b, int kvh, uint32_t q_smem) {
    using T = typename Tr::Element;
    for (int idx = threadIdx.x; idx < Tr::kRows * Tr::kChunks; idx += Tr::kThreads) {
        const int row = idx / Tr::kChunks, chunk = idx % Tr::kChunks;
        const bool valid = row < p.rows;
        const int h = valid ? row / p.seq_q : 0, s = valid ? row % p.seq_q : 0;
        const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b + (int64_t)(kvh * p.group + h) * p.q_stride_h +
                       s * p.q_stride_s + chunk * 8;
        cp_async_16(q_smem + tile_offset<Tr>(row, chunk), src, valid);
    }
}

// Upper bound on num_splits (the launcher enforces it): one weight per split per warp in shared memory.
constexpr int kMaxSplits = 128;
constexpr int kCombineWarps = 4;

// Merging split partials: out = Σ_s w_s O_s / Σ_s w_s, w_s = 2^(lse_s - max). Partials are read with
// ld.global.cg (L2): other CTAs wrote them during this kernel or the one before.
__device__ __forceinline__ int64_t partial_slot(const DecodeParams& p, int b, int kvh, int r, int s) {
    return ((int64_t)(b * p.heads_kv + kvh) * p.num_splits + s) * p.rows + r;
}

// One warp: row r's weights w_s into `weights` (kMaxSplits floats of shared memory); returns 1 / Σ_s w_s
// (0 when no split saw a key) in every lane.
__device__ __forceinline__ float row_weights(const DecodeParams& p, int b, int kvh, int r, int n_active,
                                             float* weights) {
    const int lane = threadIdx.x % 32;
    float lse_max = -INFINITY;
    for (int s = lane; s < n_active; s += 32) lse_max = fmaxf(lse_max, __ldcg(p.lse_partial + partial_slot(p, b, kvh, r, s)));
    lse_max = warp_max(lse_max);
    float total = 0.f;
    for (int s = lane; s < n_active; s += 32) {
        const float lse = __ldcg(p.lse_partial + partial_slot(p, b, kvh, r, s));
        const float w = lse == -INFINITY ? 0.f : fast_exp2(lse - lse_max);
        weights[s] = w;
        total += w;
    }
    total = warp_sum(total);
    return total > 0.f ? 1.f / total : 0.f;
}

// One thread: columns d .. d + 3 of row r, the splits summed in order (8 loads in flight: an L2 round
// trip each, one after another, made the merge latency-bound).
template <typename T, int D>
__device__ __forceinline__ void merge_columns(const DecodeParams& p, int b, int kvh, int r, int d, int n_active,
                                              const float* weights, float inv) {
    const float* part0 = p.o_partial + partial_slot(p, b, kvh, r, 0) * D + d;
    const int64_t stride = (int64_t)p.rows * D;  // floats from one split's row to the next's
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < n_active; ++s) {
        const float w = weights[s];
        const float4 part = __ldcg(reinterpret_cast<const float4*>(part0 + s * stride));
        acc.x += w * part.x, acc.y += w * part.y, acc.z += w * part.z, acc.w += w * part.w;
    }
    const int h = r / p.seq_q, s_tok = r % p.seq_q;
    T* dst = static_cast<T*>(p.out) + b * p.o_stride_b + (int64_t)(kvh * p.group + h) * p.o_stride_h +
             s_tok * p.o_stride_s + d;
    uint2 packed;
    packed.x = attn::pack2<T>(acc.x * inv, acc.y * inv);
    packed.y = attn::pack2<T>(acc.z * inv, acc.w * inv);
    *reinterpret_cast<uint2*>(dst) = packed;
}

// No valid key: every query row of (b, kvh) is zeros (what the combine writes for zero splits).
template <class Tr>
__device__ __forceinline__ void zero_output(const DecodeParams& p, int b, int kvh) {
    using T = typename Tr::Element;
    constexpr int D = Tr::kHeadDim;
    for (int idx = threadIdx.x; idx < p.rows * (D / 4); idx += Tr::kThreads) {
        const int r = idx / (D / 4), d = idx % (D / 4) * 4, h = r / p.seq_q, s = r % p.seq_q;
        T* dst = static_cast<T*>(p.out) + b * p.o_stride_b + (int64_t)(kvh * p.group + h) * p.o_stride_h +
                 s * p.o_stride_s + d;
        *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
    }
}

// The split kernel's end when it has semaphores: the last split of (b, kvh) to arrive merges them all,
// with the whole CTA (one warp a row for the weights, then one thread per 4 columns of a row). Release:
// every thread's partial stores are fenced before thread 0 counts the CTA in; acquire: the last CTA
// fences again after seeing the count. Not inlined: inlined, it raised the split kernel's register peak
// (D=128 m1: 168 -> 227; m2 spilled). `scratch`: shared memory no thread still reads.
template <class Tr>
__device__ __noinline__ void merge_if_last(const DecodeParams& p, float* scratch) {
    constexpr int D = Tr::kHeadDim;
    const int kvh = blockIdx.y, b = blockIdx.z;  // recomputed here: nothing of the caller's stays live
    const int n_active = active_splits(valid_length(p, b), p.num_splits);
    __shared__ bool s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* arrivals = p.semaphores + b * p.heads_kv + kvh;
        s_last = atomicAdd(arrivals, 1) == n_active - 1;
        if (s_last) atomicExch(arrivals, 0);  // every split has counted: zero for the next launch
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    float* weights = scratch;                        // [kRows][kMaxSplits]
    float* inv = scratch + Tr::kRows * kMaxSplits;   // [kRows]
    const int warp = threadIdx.x / 32;
    for (int r = warp; r < p.rows; r += Tr::kWarps) {
        const float row_inv = row_weights(p, b, kvh, r, n_active, weights + r * kMaxSplits);
        if (threadIdx.x % 32 == 0) inv[r] = row_inv;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < p.rows * (D / 4); idx += Tr::kThreads) {
        const int r = idx / (D / 4);
        merge_columns<typename Tr::Element, D>(p, b, kvh, r, idx % (D / 4) * 4, n_active, weights + r * kMaxSplits,
                                               inv[r]);
    }
}

template <class Tr>
__device__ __forceinline__ void decode_split(const DecodeParams& p) {
    using T = typename Tr::Element;
    constexpr int D = Tr::kHeadDim, kSteps = D / 16, kNTiles = D / 8, kKeyWarps = Tr::kKeyWarps;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ float s_m[kKeyWarps][Tr::kRows], s_l[kKeyWarps][Tr::kRows];
    __shared__ float s_m_total[Tr::kRows], s_l_total[Tr::kRows];

    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int key_warp = warp % kKeyWarps, row0 = warp / kKeyWarps * 16;  // this warp's keys and m-tile
    const int len = valid_length(p, b);
    const int chunk = split_chunk(len, p.num_splits);
    const int start = split * chunk, end = min(start + chunk, len);
    const bool direct = p.num_splits == 1;
    if (!direct && start >= len) {  // the combine skips this split too
        if (D <= 128 && len == 0 && split == 0 && p.semaphores != nullptr) zero_output<Tr>(p, b, kvh);  // no split merges
        return;
    }
    const int num_tiles = end > start ? (end - start + Tr::kTileKeys - 1) / Tr::kTileKeys : 0;

    const T* k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
    const T* v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h;
    const uint32_t pipe = smem_address(smem);
    const uint32_t q_smem = pipe + Tr::kPipeOrMerge;
    auto k_stage = [&](int s) { return pipe + s * 2 * Tr::kTileBytes; };
    auto v_stage = [&](int s) { return pipe + s * 2 * Tr::kTileBytes + Tr::kTileBytes; };

    load_q<Tr>(p, b, kvh, q_smem);
    attn::cp_async_commit();
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
        if (s < num_tiles)
            load_kv_tile<Tr>(p, k_head, v_head, start + s * Tr::kTileKeys, end, k_stage(s), v_stage(s));
        attn::cp_async_commit();
    }

    // This lane's rows are row0 + g and row0 + g + 8: the last key each may see (valid length, causal
    // diagonal) and, with a mask, the row's mask pointer.
    int last_key[2];
    const unsigned char* mask_row[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = row0 + g + hf * 8;
        const bool real = r < p.rows;
        const int h = real ? r / p.seq_q : 0, s = real ? r % p.seq_q : 0;
        last_key[hf] = (p.is_causal && real) ? min(end - 1, s + len - p.seq_q) : end - 1;
        mask_row[hf] = (p.mask != nullptr && real)
            ? p.mask + b * p.mask_stride_b + (int64_t)(kvh * p.group + h) * p.mask_stride_h + s * p.mask_stride_s
            : nullptr;
    }

    float o[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[nt][c] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int it = 0; it < num_tiles; ++it) {
        const int warp_key0 = start + it * Tr::kTileKeys + key_warp * Tr::kKeysPerWarp;
        // Visibility of this lane's 4 keys x 2 rows; mask bytes are loaded before the wait to hide latency.
        bool visible[2][4];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = warp_key0 + (e / 2) * 8 + 2 * t + e % 2;
                bool vis = key <= last_key[hf];
                if (vis && mask_row[hf] != nullptr) vis = __ldg(mask_row[hf] + key * p.mask_stride_l) != 0;
                visible[hf][e] = vis;
            }

        attn::cp_async_wait<Tr::kStages - 2>();
        __syncthreads();  // Q and tile `it` landed for every thread; stage (it - 1) is free again
        const int next = it + Tr::kStages - 1;
        if (next < num_tiles)
            load_kv_tile<Tr>(p, k_head, v_head, start + next * Tr::kTileKeys, end, k_stage(next % Tr::kStages),
                             v_stage(next % Tr::kStages));
        attn::cp_async_commit();

        const uint32_t ks_base = k_stage(it % Tr::kStages), vs_base = v_stage(it % Tr::kStages);
        // S = Q Kᵀ for this warp's 16 keys (two n8 tiles). Q fragments are re-read from shared memory
        // each tile: held in registers they made the D=256 variant spill.
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
            uint32_t qa[4], kb[4];
            attn::ldmatrix_x4(qa, q_smem + tile_offset<Tr>(row0 + lane % 8 + (lane / 8 % 2) * 8, ks * 2 + lane / 16));
            attn::ldmatrix_x4(kb, ks_base + tile_offset<Tr>(key_warp * Tr::kKeysPerWarp + (lane / 16) * 8 + lane % 8,
                                                            ks * 2 + lane / 8 % 2));
            attn::MmaOp<T>::run(sc[0], qa, kb[0], kb[1]);
            attn::MmaOp<T>::run(sc[1], qa, kb[2], kb[3]);
        }

        // Online softmax per row (exp2 domain); the 4 lanes of a quad share a row.
        uint32_t pa[4];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float x[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) x[e] = visible[hf][e] ? sc[e / 2][hf * 2 + e % 2] * p.scale_log2 : -INFINITY;
            float tile_max = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m_run[hf], tile_max);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0, no NaN
            const float alpha = fast_exp2(m_run[hf] - m_use);
            float pr[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) pr[e] = fast_exp2(x[e] - m_use);
            l_run[hf] = l_run[hf] * alpha + (pr[0] + pr[1]) + (pr[2] + pr[3]);
            m_run[hf] = m_new;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
                o[nt][hf * 2] *= alpha;
                o[nt][hf * 2 + 1] *= alpha;
            }
            // A operand of P·V: a0/a1 = keys 2t..2t+1 of rows g/g+8, a2/a3 = keys 2t+8..2t+9.
            pa[hf] = attn::pack2<T>(pr[0], pr[1]);
            pa[2 + hf] = attn::pack2<T>(pr[2], pr[3]);
        }

        // O += P V over this warp's 16 keys; V fragments transposed by ldmatrix.trans.
#pragma unroll
        for (int j = 0; j < kNTiles / 2; ++j) {
            uint32_t vb[4];
            attn::ldmatrix_x4_trans(vb, vs_base + tile_offset<Tr>(key_warp * Tr::kKeysPerWarp + (lane / 8 % 2) * 8 + lane % 8,
                                                                 2 * j + lane / 16));
            attn::MmaOp<T>::run(o[2 * j], pa, vb[0], vb[1]);
            attn::MmaOp<T>::run(o[2 * j + 1], pa, vb[2], vb[3]);
        }
    }
    attn::cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers become the merge buffer

    // Merge the key-slice warps: per row, the common max, the total sum, then the rescaled sum of O.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = l_run[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (t == 0) {
            s_m[key_warp][row0 + g + hf * 8] = m_run[hf];
            s_l[key_warp][row0 + g + hf * 8] = l;
        }
    }
    __syncthreads();
    if (threadIdx.x < Tr::kRows) {
        float m_total = -INFINITY, l_total = 0.f;
#pragma unroll
        for (int w = 0; w < kKeyWarps; ++w) m_total = fmaxf(m_total, s_m[w][threadIdx.x]);
#pragma unroll
        for (int w = 0; w < kKeyWarps; ++w)
            if (s_m[w][threadIdx.x] != -INFINITY) l_total += s_l[w][threadIdx.x] * fast_exp2(s_m[w][threadIdx.x] - m_total);
        s_m_total[threadIdx.x] = m_total;
        s_l_total[threadIdx.x] = l_total;
    }
    __syncthreads();
    float* merge = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = row0 + g + hf * 8;
        const float factor = m_run[hf] == -INFINITY ? 0.f : fast_exp2(m_run[hf] - s_m_total[r]);
        float* dst = merge + (key_warp * Tr::kRows + r) * Tr::kMergeStride + 2 * t;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
            *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][hf * 2] * factor, o[nt][hf * 2 + 1] * factor);
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < p.rows * (D / 4); idx += Tr::kThreads) {
        const int r = idx / (D / 4), d = idx % (D / 4) * 4;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < kKeyWarps; ++w) {
            const float4 part = *reinterpret_cast<const float4*>(merge + (w * Tr::kRows + r) * Tr::kMergeStride + d);
            acc.x += part.x, acc.y += part.y, acc.z += part.z, acc.w += part.w;
        }
        const float l_total = s_l_total[r];
        const float inv = l_total > 0.f ? 1.f / l_total : 0.f;  // a row with no visible key -> zeros
        acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
        if (direct) {
            const int h = r / p.seq_q, s = r % p.seq_q;
            T* dst = static_cast<T*>(p.out) + b * p.o_stride_b + (int64_t)(kvh * p.group + h) * p.o_stride_h +
                     s * p.o_stride_s + d;
            uint2 packed;
            packed.x = attn::pack2<T>(acc.x, acc.y);
            packed.y = attn::pack2<T>(acc.z, acc.w);
            *reinterpret_cast<uint2*>(dst) = packed;
        } else {
            const int64_t slot = ((int64_t)(b * p.heads_kv + kvh) * p.num_splits + split) * p.rows + r;
            *reinterpret_cast<float4*>(p.o_partial + slot * D + d) = acc;
            if (d == 0) p.lse_partial[slot] = l_total > 0.f ? s_m_total[r] + __log2f(l_total) : -INFINITY;
        }
    }
    // With semaphores, the last split of this (batch, kv head) to finish merges them all. D = 256 (253
    // registers) has no room for the call: it always merges in the combine kernel (attention_decode.py's
    // MERGES_IN_SPLIT_KERNEL).
    if constexpr (D <= 128) {
        if (direct || p.semaphores == nullptr) return;
        static_assert(Tr::kRows * (kMaxSplits + 1) * 4 <= Tr::kPipeOrMerge, "merge weights fit the pipeline buffers");
        merge_if_last<Tr>(p, reinterpret_cast<float*>(smem));
    }
}

// Grid (ceil(rows / 4), Hkv, B), one warp per query row (the split kernel merges instead when it has
// semaphores; both sum the splits in the same order, so they give the same bits).
template <typename T, int D>
__device__ __forceinline__ void combine_splits(const DecodeParams& p) {
    __shared__ float s_weight[kCombineWarps][kMaxSplits];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.x * kCombineWarps + warp, kvh = blockIdx.y, b = blockIdx.z;
    if (r >= p.rows) return;
    const int n_active = active_splits(valid_length(p, b), p.num_splits);
    const float inv = row_weights(p, b, kvh, r, n_active, s_weight[warp]);
    __syncwarp();
#pragma unroll
    for (int d = lane * 4; d < D; d += 128) merge_columns<T, D>(p, b, kvh, r, d, n_active, s_weight[warp], inv);
}

}  // namespace fusedops::decode

// The variants the launcher picks from: element type x head dim x m-tiles (rows <= 16 * m-tiles).
#define FUSEDOPS_DECODE_SPLIT(T, NAME, D, M)                                                            \
    extern "C" __global__ void __launch_bounds__(128 * M)                                               \
        attn_decode_##NAME##_d##D##_m##M(const __grid_constant__ DecodeParams p) {                       \
        fusedops::pdl::enter();                                                                          \
        fusedops::decode::decode_split<fusedops::decode::DecodeTraits<T, D, M>>(p);                     \
    }
#define FUSEDOPS_DECODE_COMBINE(T, NAME, D)                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
        attn_decode_combine_##NAME##_d##D(const __grid_constant__ DecodeParams p) {                      \
        fusedops::pdl::enter();                                                                          \
        fusedops::decode::combine_splits<T, D>(p);                                                      \
    }
#define FUSEDOPS_DECODE_VARIANTS(T, NAME)                                                               \
    FUSEDOPS_DECODE_SPLIT(T, NAME, 64, 1)                                                               \
    FUSEDOPS_DECODE_SPLIT(T, NAME, 64, 2)                                                               \
    FUSEDOPS_DECODE_SPLIT(T, NAME, 128, 1)                                                              \
    FUSEDOPS_DECODE_SPLIT(T, NAME, 128, 2)                                                              \
    FUSEDOPS_DECODE_SPLIT(T, NAME, 256, 1)                                                              \
    FUSEDOPS_DECODE_COMBINE(T, NAME, 64)                                                                \
    FUSEDOPS_DECODE_COMBINE(T, NAME, 128)                                                               \
    FUSEDOPS_DECODE_COMBINE(T, NAME, 256)

FUSEDOPS_DECODE_VARIANTS(__nv_bfloat16, bf16)
FUSEDOPS_DECODE_VARIANTS(__half, fp16)
