// Block map of a boolean attention mask, for the prefill kernel's tile skipping (attention_prefill.cu):
// flags[b][h][r][c] = OR over the mask's cell (rows 64r.., keys 32c..) of kSomeVisible (a True) and
// kSomeMasked (a False). One pass over the mask; one map per mask per forward serves every layer.
//
// CTA = 32 x 8 threads over 32 adjacent cells of one cell row: lane x owns cell c (32 keys, two 16-byte
// loads per mask row: a warp reads 1 KiB contiguous per row), y owns 8 of the 64 rows; the 8 partial
// flags meet in shared memory.
#include "common/pdl.cuh"
#include "attention/prefill_params.cuh"

namespace {

constexpr int kRowGroups = 8;  // threadIdx.y
constexpr int kRowsPerThread = kMaskCellRows / kRowGroups;

__device__ __forceinline__ uint32_t word_flags(uint32_t w) {
    const bool has_zero_byte = ((w - 0x01010101u) & ~w & 0x80808080u) != 0;
    return (w != 0 ? kSomeVisible : 0u) | (has_zero_byte ? kSomeMasked : 0u);
}

__device__ __forceinline__ uint32_t chunk_flags(const uint4& v) {
    return word_flags(v.x) | word_flags(v.y) | word_flags(v.z) | word_flags(v.w);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(32 * kRowGroups)
    attention_mask_blocks(const __grid_constant__ MaskBlocksParams p) {
    fusedops::pdl::enter();  // before any read or write of tensors (common/pdl.cuh)
    __shared__ uint8_t partial[kRowGroups][32];
    const int cell_col = blockIdx.x * 32 + threadIdx.x, cell_row = blockIdx.y;
    const int batch = blockIdx.z / p.heads, head = blockIdx.z % p.heads;
    const uint8_t* mask = p.mask + batch * p.mask_batch + head * p.mask_head;
    const int key0 = cell_col * kMaskCellKeys;

    uint32_t flags = 0;
    if (key0 < p.keys) {
        const int row0 = cell_row * kMaskCellRows + threadIdx.y * kRowsPerThread;
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            const int row = row0 + i;
            if (row >= p.rows) break;
            const uint8_t* src = mask + row * p.mask_row + key0;
            if (p.vectorized) {  // keys % 16 == 0: a chunk that starts inside the row ends inside it
                flags |= chunk_flags(*reinterpret_cast<const uint4*>(src));
                if (key0 + 16 < p.keys) flags |= chunk_flags(*reinterpret_cast<const uint4*>(src + 16));
            } else {
                const int n = min(kMaskCellKeys, p.keys - key0);
                for (int j = 0; j < n; ++j) flags |= src[j] != 0 ? kSomeVisible : kSomeMasked;
            }
        }
    }
    partial[threadIdx.y][threadIdx.x] = static_cast<uint8_t>(flags);
    __syncthreads();
    if (threadIdx.y == 0 && cell_col < p.cell_cols) {
#pragma unroll
        for (int g = 1; g < kRowGroups; ++g) flags |= partial[g][threadIdx.x];
        const int64_t cell = (static_cast<int64_t>(blockIdx.z) * p.cell_rows + cell_row) * p.cell_cols + cell_col;
        p.blocks[cell] = static_cast<uint8_t>(flags);
    }
}
