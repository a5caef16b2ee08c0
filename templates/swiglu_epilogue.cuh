// SwiGLU epilogue for one GEMM over the block-interleaved [Wg; Wu] weight
// (fusedops.ops.gemm.prepare_gate_up with block = TileN / 2): the left half of every output tile
// holds gate columns, the right half the matching up columns. Each thread combines
// h = silu(g) * u in registers and stores half the columns, so the gate/up products never reach HBM.
//
// It relies on the SM90 wgmma accumulator layout: per 64xN atom a thread's values are
// (2 adjacent columns, 2 rows 8 apart, N/8 column groups of 8), so column n and n + TileN/2 sit
// in the same thread, TileN/16 groups apart. The static_asserts pin that assumption.
// Plugs into the SM90 warp-specialized kernels through Sm90TmaWarpSpecializedAdapter (no smem).
#pragma once
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/numeric_conversion.h"

namespace fusedops::gemm {

// The thread-level op: h = silu(g) * u in fp32, rounded once to the output type. The fast divide
// (rcp + mul) keeps the non-overlapped epilogue short; for g < -88 it divides by inf and gives -0.
struct SiluMul {
    CUTLASS_DEVICE float operator()(float g, float u) const { return __fdividef(g, 1.f + __expf(-g)) * u; }
};

template <class ElementOut, class TileShape>
class SwigluEpilogue {
 public:
    using ElementOutput = ElementOut;
    using ElementAccumulator = float;
    using ElementCompute = float;
    using ElementC = void;
    using ElementD = ElementOut;
    using StrideC = cute::Stride<int64_t, cute::Int<1>, int64_t>;
    using StrideD = StrideC;
    using GmemTiledCopyC = void;
    using GmemTiledCopyD = void;
    using EpilogueSchedule = cutlass::epilogue::NoSmemWarpSpecialized;
    using DispatchPolicy = EpilogueSchedule;
    using ThreadEpilogueOp = SiluMul;

    static constexpr int kTileN = cute::size<1>(TileShape{});
    static constexpr int kHalf = kTileN / 2;
    static_assert(kHalf % 8 == 0, "gate and up halves must each be whole 8-column wgmma groups");

    struct SharedStorage {};
    using TensorStorage = SharedStorage;

    struct Arguments {
        ElementOut* ptr_out = nullptr;  // [m, n / 2]
        int64_t ld_out = 0;
    };
    using Params = Arguments;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
        return args;
    }
    template <class ProblemShape>
    static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
    template <class ProblemShape>
    static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                                cutlass::CudaHostAdapter* = nullptr) {
        return cutlass::Status::kSuccess;
    }
    // Whole tiles along N only (the interleave block is TileN / 2); 4-byte pair stores.
    template <class ProblemShape>
    static bool can_implement(ProblemShape const& problem, Arguments const& args) {
        const auto n = cute::get<1>(problem);
        return n % kTileN == 0 && args.ptr_out != nullptr && args.ld_out >= n / 2 && args.ld_out % 2 == 0;
    }

    CUTLASS_HOST_DEVICE explicit SwigluEpilogue(Params const& params, SharedStorage const& = SharedStorage())
        : params_(params) {}

    CUTLASS_DEVICE bool is_source_needed() { return false; }

    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
              class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                   BlockCoordMNKL blk_coord_mnkl,
                                   cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                   ResidueMNK, int thread_idx, char*) {
        using namespace cute;
        static_assert(size<1>(BlockShapeMNK{}) == kTileN, "epilogue and mainloop tiles differ");
        static_assert(rank(FrgLayout{}) == 3 && rank<0>(FrgLayout{}) == 3, "expected ((2,2,N/8),MMA_M,MMA_N)");
        static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2, "expected a wgmma C fragment");
        static_assert(size<0, 2>(FrgLayout{}) * 8 == kTileN && size<2>(FrgLayout{}) == 1,
                      "one wgmma atom must span the tile's N so gate/up partners share a thread");
        constexpr int kGroups = size<0, 2>(FrgLayout{});
        constexpr int kMmaM = size<1>(FrgLayout{});

        const int64_t m_total = get<0>(problem_shape_mnkl);
        const int64_t row0 = int64_t(get<0>(blk_coord_mnkl)) * size<0>(blk_shape_mnk);
        const int64_t col0 = int64_t(get<1>(blk_coord_mnkl)) * kHalf;
        // (m, n) inside the tile of every accumulator value this thread holds.
        Tensor coords = tiled_mma.get_thread_slice(thread_idx).partition_C(
            make_identity_tensor(take<0, 2>(blk_shape_mnk)));

        cutlass::NumericArrayConverter<ElementOut, float, 2> convert;
        SiluMul silu_mul;
        CUTLASS_PRAGMA_UNROLL
        for (int mm = 0; mm < kMmaM; ++mm) {
            CUTLASS_PRAGMA_UNROLL
            for (int grp = 0; grp < kGroups / 2; ++grp) {
                CUTLASS_PRAGMA_UNROLL
                for (int half_row = 0; half_row < 2; ++half_row) {
                    const auto mn = coords(make_coord(make_coord(0, half_row, grp), mm, 0));
                    const int64_t row = row0 + get<0>(mn);
                    if (row < m_total) {
                        cutlass::Array<float, 2> h;
                        CUTLASS_PRAGMA_UNROLL
                        for (int col = 0; col < 2; ++col) {
                            h[col] = silu_mul(accumulators(make_coord(make_coord(col, half_row, grp), mm, 0)),
                                              accumulators(make_coord(make_coord(col, half_row, grp + kGroups / 2), mm, 0)));
                        }
                        auto* dst = params_.ptr_out + row * params_.ld_out + col0 + get<1>(mn);
                        *reinterpret_cast<cutlass::Array<ElementOut, 2>*>(dst) = convert(h);
                    }
                }
            }
        }
    }

 private:
    Params params_;
};

}  // namespace fusedops::gemm
