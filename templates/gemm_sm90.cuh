// CUTLASS 3 SM90 GEMM instantiation template: D = x * W^T with a fused epilogue, bf16 in/out,
// fp32 accumulation, TMA loads, wgmma, warp-specialized kernels from the collective builders.
// Read it as CUTLASS example 49's chain: epilogue collective -> mainloop collective (stages carved
// out of the epilogue's shared storage) -> kernel -> adapter. fusedops/gemm_codegen.py writes one
// .cu per row of its table: a GemmConfig plus FUSEDOPS_GEMM_EXPORT, the C-ABI host launcher.
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "gemm_args.h"
#include "swiglu_epilogue.cuh"

namespace fusedops::gemm {

enum class Epilogue {
    kLinear,  // D = alpha * acc + beta * C: plain GEMM (beta = 0) and GEMM + residual (beta = 1)
    kSwiglu,  // D[:, j] = silu(acc gate column) * acc up column, half the columns
};
enum class Schedule { kCooperative, kPingpong };
enum class Scheduler { kPersistent, kStreamK };

template <int TileM_, int TileN_, int TileK_, int ClusterM_, int ClusterN_, Schedule Schedule_,
          Scheduler Scheduler_, Epilogue Epilogue_>
struct GemmConfig {
    static constexpr int kTileM = TileM_, kTileN = TileN_, kTileK = TileK_;
    static constexpr int kClusterM = ClusterM_, kClusterN = ClusterN_;
    static constexpr Schedule kSchedule = Schedule_;
    static constexpr Scheduler kScheduler = Scheduler_;
    static constexpr Epilogue kEpilogue = Epilogue_;
    static_assert(!(Schedule_ == Schedule::kPingpong && Scheduler_ == Scheduler::kStreamK),
                  "CUTLASS's stream-K scheduler runs the cooperative kernel only");
};

template <class Config>
struct GemmTraits {
    using Element = cutlass::bfloat16_t;
    using LayoutA = cutlass::layout::RowMajor;     // x [m, k]
    using LayoutB = cutlass::layout::ColumnMajor;  // W [n, k] row-major == B [k, n] column-major
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int kAlignment = 16 / sizeof(Element);  // TMA: 16-byte aligned rows

    using TileShape = cute::Shape<cute::Int<Config::kTileM>, cute::Int<Config::kTileN>, cute::Int<Config::kTileK>>;
    using ClusterShape = cute::Shape<cute::Int<Config::kClusterM>, cute::Int<Config::kClusterN>, cute::_1>;
    static constexpr bool kPingpong = Config::kSchedule == Schedule::kPingpong;
    using KernelSchedule = std::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                              cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
    using EpilogueSchedule = std::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                                cutlass::epilogue::TmaWarpSpecializedCooperative>;
    using TileScheduler = std::conditional_t<Config::kScheduler == Scheduler::kStreamK,
                                             cutlass::gemm::StreamKScheduler, cutlass::gemm::PersistentScheduler>;

    using LinearEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float,
        Element, LayoutD, kAlignment, Element, LayoutD, kAlignment, EpilogueSchedule,
        cutlass::epilogue::fusion::LinearCombination<Element, float, Element, float>>::CollectiveOp;
    using SwigluCollective =
        cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SwigluEpilogue<Element, TileShape>>;
    using CollectiveEpilogue =
        std::conditional_t<Config::kEpilogue == Epilogue::kSwiglu, SwigluCollective, LinearEpilogue>;

    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
        Element, LayoutA, kAlignment, Element, LayoutB, kAlignment, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue, TileScheduler>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    static constexpr int kStages = CollectiveMainloop::DispatchPolicy::Stages;
};

// Every stride below is (leading dimension, 1, batch stride 0): one row-major/K-major matrix.
template <class Stride>
Stride leading(int64_t ld) {
    Stride s{};
    cute::get<0>(s) = ld;
    return s;
}

template <class Traits>
typename Traits::Gemm::Arguments make_arguments(FusedGemmArgs const& a) {
    using Kernel = typename Traits::Kernel;
    using Element = typename Traits::Element;
    using namespace cutlass::gemm::kernel::detail;
    typename Traits::Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {static_cast<int>(a.m), static_cast<int>(a.n), static_cast<int>(a.k), 1};
    args.mainloop.ptr_A = static_cast<Element const*>(a.a);
    args.mainloop.dA = leading<typename Kernel::StrideA>(a.lda);
    args.mainloop.ptr_B = static_cast<Element const*>(a.b);
    args.mainloop.dB = leading<typename Kernel::StrideB>(a.ldb);
    if constexpr (std::is_same_v<typename Traits::CollectiveEpilogue, typename Traits::SwigluCollective>) {
        args.epilogue.ptr_out = static_cast<Element*>(a.d);
        args.epilogue.ld_out = a.ldd;
    } else {
        args.epilogue.thread.alpha = a.alpha;
        args.epilogue.thread.beta = a.beta;
        args.epilogue.ptr_C = static_cast<Element const*>(a.c);
        args.epilogue.dC = leading<typename Kernel::StrideC>(a.ldc);
        args.epilogue.ptr_D = static_cast<Element*>(a.d);
        args.epilogue.dD = leading<typename Kernel::StrideD>(a.ldd);
    }
    args.hw_info.device_id = a.device;
    args.hw_info.sm_count = a.sm_count;
    args.scheduler.max_swizzle_size = a.swizzle;
    args.scheduler.raster_order = static_cast<RasterOrderOptions>(a.raster);
    if constexpr (std::is_same_v<typename Traits::TileScheduler, cutlass::gemm::StreamKScheduler>) {
        args.scheduler.splits = a.splits;
        args.scheduler.decomposition_mode = static_cast<DecompositionMode>(a.decomposition);
    }
    return args;
}

// Return codes: 0 ok, 1..99 cutlass::Status, 1000 + cudaError_t.
constexpr int kCudaErrorBase = 1000;

template <class Traits>
int run(FusedGemmArgs const& a, cudaStream_t stream) {
    if (cudaError_t err = cudaSetDevice(a.device); err != cudaSuccess) return kCudaErrorBase + err;
    auto args = make_arguments<Traits>(a);
    typename Traits::Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, a.workspace, stream);
    if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) {
        cudaError_t err = cudaGetLastError();  // a failed launch reports kErrorInternal; say why
        return err != cudaSuccess ? kCudaErrorBase + err : static_cast<int>(status);
    }
    return 0;
}

template <class Traits>
size_t workspace_size(FusedGemmArgs const& a) {
    return Traits::Gemm::get_workspace_size(make_arguments<Traits>(a));
}

inline const char* error_string(int code) {
    if (code >= kCudaErrorBase) return cudaGetErrorString(static_cast<cudaError_t>(code - kCudaErrorBase));
    return cutlass::cutlassGetStatusString(static_cast<cutlass::Status>(code));
}

}  // namespace fusedops::gemm

// The C ABI each generated library exports (one instantiation per library, loaded with ctypes).
// fusedops_gemm_config fills 8 ints: tile m, n, k, cluster m, n, stages, epilogue, smem bytes.
#define FUSEDOPS_GEMM_EXPORT(TRAITS)                                                                     \
    extern "C" int fusedops_gemm_run(const FusedGemmArgs* args, cudaStream_t stream) {                   \
        return fusedops::gemm::run<TRAITS>(*args, stream);                                               \
    }                                                                                                    \
    extern "C" size_t fusedops_gemm_workspace_size(const FusedGemmArgs* args) {                          \
        return fusedops::gemm::workspace_size<TRAITS>(*args);                                            \
    }                                                                                                    \
    extern "C" size_t fusedops_gemm_args_size() { return sizeof(FusedGemmArgs); }                        \
    extern "C" const char* fusedops_gemm_error_string(int code) { return fusedops::gemm::error_string(code); } \
    extern "C" void fusedops_gemm_config(int* out) {                                                     \
        using C = TRAITS;                                                                                \
        const int values[8] = {cute::size<0>(typename C::TileShape{}), cute::size<1>(typename C::TileShape{}), \
                               cute::size<2>(typename C::TileShape{}), cute::size<0>(typename C::ClusterShape{}), \
                               cute::size<1>(typename C::ClusterShape{}), C::kStages,                    \
                               static_cast<int>(std::is_same_v<typename C::CollectiveEpilogue,            \
                                                               typename C::SwigluCollective>),           \
                               static_cast<int>(C::Kernel::SharedStorageSize)};                          \
        for (int i = 0; i < 8; ++i) out[i] = values[i];                                                  \
    }
