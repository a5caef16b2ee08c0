// Programmatic dependent launch (sm_90+). The launcher (fusedops/runtime/driver.py) may start a kernel
// while the previous kernel on the stream is still running, so the next kernel's launch, CTA placement and
// prologue overlap the previous one's tail instead of following it (about 1-2 us a kernel boundary in a
// decode step of ~260 small kernels). That is safe only because every fusedops kernel calls enter() before
// it reads anything an earlier kernel wrote or writes anything an earlier kernel may still read.
#pragma once

namespace fusedops {
namespace pdl {

// Wait for the kernel this one depends on to finish (its writes visible), then let the next kernel launch.
// Releasing after the wait, not before, keeps at most one grid waiting behind the running one. Without the
// launch attribute both instructions do nothing.
__device__ __forceinline__ void enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Pull a read-only line (weights: nothing in a forward pass writes them) toward L2 before enter().
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

}  // namespace pdl
}  // namespace fusedops
