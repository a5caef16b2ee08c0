// Split-KV decode attention over a static KV cache: the params struct both kernels take (mirrored by
// DecodeParams in fusedops/ops/attention_decode.py) and the compile-time traits of one variant.
#pragma once
#include <stdint.h>

struct DecodeParams {
    const void* q;               // [B, Hq, S, D], unit last stride
    const void* k;               // [B, Hkv, L_max, D], unit last stride
    const void* v;
    void* out;                   // [B, Hq, S, D]
    float* o_partial;            // [B, Hkv, splits, rows, D] fp32, normalized per split (splits > 1 only)
    float* lse_partial;          // [B, Hkv, splits, rows], log2 domain, -inf when a split saw no key
    const void* kv_len;          // int32/int64 valid lengths, or null: every one of the L_max keys is valid
    const unsigned char* mask;   // bool, strides below (0 where broadcast), or null
    int* semaphores;             // [B * Hkv] arrival counters, zero between launches, or null: merge in the
                                 // combine kernel (splits > 1 only)
    int64_t q_stride_b, q_stride_h, q_stride_s;
    int64_t k_stride_b, k_stride_h, k_stride_l;
    int64_t v_stride_b, v_stride_h, v_stride_l;
    int64_t o_stride_b, o_stride_h, o_stride_s;
    int64_t mask_stride_b, mask_stride_h, mask_stride_s, mask_stride_l;
    int64_t kv_len_stride;       // 0 when one length serves the whole batch
    int32_t kv_len_is_int64;
    int32_t heads_kv;
    int32_t seq_q;               // S, new tokens per sequence
    int32_t group;               // Hq / Hkv
    int32_t rows;                // group * S: query rows that share one kv head
    int32_t cache_len;           // L_max
    int32_t num_splits;
    int32_t is_causal;
    float scale_log2;            // softmax scale * log2(e): scores live in the exp2 domain
};

namespace fusedops::decode {

// Keys per pipeline tile; a split always holds a whole number of tiles (the combine kernel relies on it).
constexpr int kTileKeys = 64;

// One CTA: all `rows` query rows of one (batch, kv head) against one split of the cache, streamed in
// tiles of 64 keys. Warp w works on m-tile w / 4 (16 query rows) and keys 16 * (w % 4) .. +15 of each
// tile, with its own softmax state; the 4 key-slice warps of an m-tile merge at the end.
template <typename T, int D, int M_TILES>
struct DecodeTraits {
    using Element = T;
    static constexpr int kHeadDim = D;
    static constexpr int kMTiles = M_TILES;               // 16-row mma tiles of query rows
    static constexpr int kRows = 16 * M_TILES;
    static constexpr int kKeyWarps = 4;
    static constexpr int kWarps = kKeyWarps * M_TILES;    // one m-tile per warp: O stays at 64 regs (D=128)
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kKeysPerWarp = 16;               // one k16 step of P·V per tile
    static constexpr int kTileKeys = decode::kTileKeys;
    static constexpr int kChunks = D / 8;                 // 16-byte chunks per row
    static constexpr int kTileBytes = kTileKeys * D * (int)sizeof(T);   // K or V of one tile
    // Three 64-key stages of K+V for D=128 (96 KB): two CTAs per SM keep ≥ 128 KB of loads in flight.
    static constexpr int kStages = D <= 64 ? 4 : D <= 128 ? 3 : 2;
    static constexpr int kPipeBytes = kStages * 2 * kTileBytes;
    static constexpr int kMergeStride = D + 4;            // floats; +4 spreads rows over the banks
    static constexpr int kMergeBytes = kKeyWarps * kRows * kMergeStride * 4;
    static constexpr int kQBytes = kRows * D * (int)sizeof(T);
    static constexpr int kPipeOrMerge = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
    static constexpr int kSmemBytes = kPipeOrMerge + kQBytes;

    static_assert(kTileKeys == kKeyWarps * kKeysPerWarp, "each warp owns 16 keys of a tile");
    static_assert(sizeof(T) == 2, "mma.sync path: bf16 or fp16 only");
    static_assert(D % 64 == 0, "the swizzle needs rows of at least 8 16-byte chunks");
    static_assert((kTileKeys * kChunks) % kThreads == 0, "tile loads split evenly over the CTA");
    static_assert(kSmemBytes <= 227 * 1024, "over the sm_90 shared-memory limit");
};

// Keys [start, end) of split `split` when `len` keys are valid: every split gets the same whole number
// of 64-key tiles, so a short cache uses few splits and a long one spreads over all of them.
__device__ __forceinline__ int split_chunk(int len, int num_splits) {
    const int per_split = (len + num_splits - 1) / num_splits;
    return (per_split + kTileKeys - 1) / kTileKeys * kTileKeys;
}

__device__ __forceinline__ int active_splits(int len, int num_splits) {
    const int chunk = split_chunk(len, num_splits);
    return chunk == 0 ? 0 : (len + chunk - 1) / chunk;
}

// Valid keys of batch b, read on the device so that a replayed CUDA graph sees the current length.
__device__ __forceinline__ int valid_length(const DecodeParams& p, int b) {
    if (p.kv_len == nullptr) return p.cache_len;
    const int64_t i = b * p.kv_len_stride;
    const int64_t len = p.kv_len_is_int64 ? static_cast<const int64_t*>(p.kv_len)[i]
                                          : static_cast<const int32_t*>(p.kv_len)[i];
    return static_cast<int>(len < 0 ? 0 : len > p.cache_len ? p.cache_len : len);
}

}  // namespace fusedops::decode
