// 16-byte vectorized global access and float conversion for bf16 / fp16 / fp32 elements.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fusedops {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements of T held as one aligned chunk; N * sizeof(T) is 16 bytes for the vector path.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

// One global load of N elements. For 16 bytes this is a single ld.global.v4.u32 (LDG.E.128).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
    return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& val) {
    *reinterpret_cast<Vec<T, N>*>(ptr) = val;
}

// Elements per 16-byte vector.
template <typename T> constexpr int kVec16 = 16 / sizeof(T);

}  // namespace fusedops
