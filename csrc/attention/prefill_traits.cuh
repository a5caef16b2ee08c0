// Compile-time shape of one prefill attention variant: head dim, Q/K tile sizes, warps, stages.
// Each warp owns kBlockM / kWarps query rows (1 or 2 m16 tiles); K/V stream through kStages
// shared-memory stages. The variant table lives in fusedops/ops/attention.py (PREFILL_TILES).
#pragma once

namespace fusedops::attn {

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kStages_>
struct PrefillTraits {
    using T = T_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kWarps = kWarps_;
    static constexpr int kStages = kStages_;
    static constexpr int kThreads = kWarps * 32;

    static constexpr int kRowsPerWarp = kBlockM / kWarps;
    static constexpr int kMTiles = kRowsPerWarp / 16;      // m16 tiles per warp
    static constexpr int kNTiles = kBlockN / 8;            // n8 tiles of S per warp
    static constexpr int kDTiles = kHeadDim / 8;           // n8 tiles of O per warp
    static constexpr int kChunks = kHeadDim * 2 / 16;      // 16-byte chunks per row

    static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;
    static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2;
    static constexpr int kStageBytes = 2 * kTileKVBytes;   // K then V
    static constexpr int kSmemSize = kTileQBytes + kStages * kStageBytes;

    static_assert(sizeof(T) == 2, "bf16 / fp16 only");
    static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "head dim 64, 128, 192 or 256");
    static_assert(kRowsPerWarp % 16 == 0 && kMTiles >= 1 && kMTiles <= 2, "16 or 32 rows per warp");
    static_assert(kBlockN % 16 == 0, "key tile is a multiple of the mma k (16)");
    static_assert(kStages == 2, "the main loop's wait counts assume a 2-stage ring");
    static_assert((kBlockM * kChunks) % kThreads == 0 && (kBlockN * kChunks) % kThreads == 0,
                  "tile copies divide evenly over the threads");
    static_assert(kSmemSize <= 227 * 1024, "shared memory per CTA on sm_90");
};

}  // namespace fusedops::attn
