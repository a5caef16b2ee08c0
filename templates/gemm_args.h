// The one argument block every generated GEMM launcher takes (mirrored by GemmArgs in
// fusedops/ops/gemm.py; fusedops_gemm_args_size() lets Python check the two agree).
// Layouts: a = x [m, k] row-major, b = weight [n, k] row-major (nn.Linear), c/d = [m, n]
// row-major, except the SwiGLU epilogue, whose d is [m, n / 2]. Leading dimensions in elements.
#pragma once
#include <stdint.h>

struct FusedGemmArgs {
    const void* a;
    const void* b;
    const void* c;          // residual for beta != 0; may alias d when beta == 0
    void* d;
    void* workspace;        // fusedops_gemm_workspace_size() bytes (stream-K partials), or null
    int64_t m, n, k;
    int64_t lda, ldb, ldc, ldd;
    float alpha, beta;
    int32_t device;         // CUDA device index (this library has its own runtime state)
    int32_t sm_count;       // SMs the persistent grid may use
    int32_t swizzle;        // tile-scheduler swizzle (1, 2, 4, 8)
    int32_t raster;         // 0 heuristic, 1 along M, 2 along N
    int32_t splits;         // stream-K variants: split-K factor when decomposition == 2
    int32_t decomposition;  // stream-K variants: 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K
};
