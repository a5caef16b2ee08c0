// Runtime arguments of the prefill attention kernel, mirrored by AttentionPrefillParams in
// fusedops/ops/attention.py. Strides are in elements; the last (head) dim is contiguous.
#pragma once
#include <stdint.h>

struct AttentionPrefillParams {
    const void* q;               // [B, Hq, S, D]   (varlen: [T, Hq, D], batch stride unused)
    const void* k;               // [B, Hkv, Skv, D]
    const void* v;
    void* out;                   // same layout rules as q
    float* lse;                  // optional [B, Hq, S] fp32 (natural log); null = not written
    const uint8_t* mask;         // optional bool, broadcast strides (0 where broadcast)
    const void* kv_len;          // optional int32/int64 [B] or [1]
    const int32_t* cu_seqlens_q; // varlen only: [B + 1]
    const int32_t* cu_seqlens_k;
    const uint8_t* mask_blocks;  // non-null iff mask: MaskBlocks flags of its 64-row x 32-key cells
    int64_t q_batch, q_head, q_row;
    int64_t k_batch, k_head, k_row;
    int64_t v_batch, v_head, v_row;
    int64_t o_batch, o_head, o_row;
    int64_t lse_batch, lse_head;  // lse rows are contiguous
    int64_t mask_batch, mask_head, mask_row, mask_col;
    int64_t kv_len_stride;       // 0 for a [1] tensor
    int64_t blocks_batch, blocks_head, blocks_row, blocks_col;  // 0 where the mask broadcasts
    int32_t seqlen_q, seqlen_k;  // varlen: the maxima (grid bound only)
    int32_t heads_q, group;      // group = Hq / Hkv
    int32_t kv_len_is_int64;
    int32_t is_causal;
    int32_t mask_pairs;          // mask_col == 1, even strides and Skv: two keys per 2-byte load
    float scale_log2;            // softmax scale * log2(e)
    float scale;
};

// Block map of a boolean mask (attention_mask_blocks): one byte per cell of kMaskCellRows query rows
// x kMaskCellKeys keys, the OR of kSomeVisible / kSomeMasked over the cell's elements. Any OR over a
// superset of cells stays exact about "nothing visible" and "nothing masked", so a kernel tile may
// combine several cells. Mirrored by MASK_CELL in fusedops/ops/attention.py.
constexpr int kMaskCellRows = 64;
constexpr int kMaskCellKeys = 32;
constexpr uint32_t kSomeVisible = 1;
constexpr uint32_t kSomeMasked = 2;

struct MaskBlocksParams {
    const uint8_t* mask;         // [Bm, Hm, Sm, Skvm] bool, unit key stride
    uint8_t* blocks;             // [Bm, Hm, ceil(Sm / 64), ceil(Skvm / 32)] contiguous
    int64_t mask_batch, mask_head, mask_row;
    int32_t heads, rows, keys;   // Hm, Sm, Skvm
    int32_t cell_rows, cell_cols;  // ceil(Sm / 64), ceil(Skvm / 32)
    int32_t vectorized;          // 16-byte loads: aligned base and strides, Skvm % 16 == 0
};
