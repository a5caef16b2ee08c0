// Rotary position embedding on q and k in one launch, optionally also writing the rotated k and v
// into a static KV cache at positions read on the device (CUDA-graph safe, replaces HF's index_copy_).
// HF's arithmetic in fp32, rounded once to T (as Inductor fuses it; eager rounds after each op and sits
// further from an fp32 model): out = T( x * cos + rotate(x) * sin ),
//   rotate_half: rotate(x)[j] = -x[j + D/2], rotate(x)[j + D/2] = x[j]    (j < D/2)
//   interleaved (GPT-J): rotate(x)[2i] = -x[2i + 1], rotate(x)[2i + 1] = x[2i]
// One CTA per token (b, s); its threads walk (head, chunk) pairs of q heads, then k heads, then
// (cache mode) v heads. A chunk is two VEC-element vectors holding whole rotation pairs: halves mode
// takes vectors at c*VEC and c*VEC + D/2, interleaved mode the neighbours 2c*VEC and (2c+1)*VEC.
#include "common/pdl.cuh"
#include "common/vec.cuh"

struct RopeParams {
    void* q_out;
    void* k_out;            // [B, Hkv, S, D] tensor, or k_cache [B, Hkv, L, D] in cache mode
    void* v_out;            // v_cache, or null (plain RoPE: no v)
    const void* q;
    const void* k;
    const void* v;
    const void* cos;
    const void* sin;
    const void* positions;  // int32/int64 [S] cache positions, or null (write at s)
    int64_t seq;
    int64_t q_heads;
    int64_t kv_heads;
    int64_t head_dim;
    int64_t cache_len;      // positions outside [0, cache_len) are not written
    // strides in elements, order (batch, head, seq)
    int64_t q_stride[3];
    int64_t k_stride[3];
    int64_t v_stride[3];
    int64_t q_out_stride[3];
    int64_t k_out_stride[3];
    int64_t v_out_stride[3];
    int64_t cs_stride[2];   // cos/sin (batch, seq); batch stride 0 when shared
    int32_t positions_int64;
};

// Threads per CTA (one token): Llama-3-8B has 40 heads x 8 chunks = 320 pairs per token in bf16.
constexpr int kRopeThreads = 512;

namespace fusedops {

// VEC cos/sin values as floats, read in 16-byte pieces: C is q's dtype, or float (the fp32 cos/sin HF
// computes before casting them to q's dtype; reading them skips that rounding, as Inductor's fusion does).
template <typename C, int VEC>
__device__ __forceinline__ void load_floats(const C* p, float (&f)[VEC]) {
    constexpr int kPiece = VEC < kVec16<C> ? VEC : kVec16<C>;
#pragma unroll
    for (int i = 0; i < VEC; i += kPiece) {
        const Vec<C, kPiece> v = load_vec<C, kPiece>(p + i);
#pragma unroll
        for (int j = 0; j < kPiece; ++j) f[i + j] = to_float(v.v[j]);
    }
}

template <typename T, typename C, int VEC>
__device__ __forceinline__ void rotate_pair(const T* x, T* out, const C* c, const C* s, int64_t o0, int64_t o1,
                                            bool interleaved) {
    const Vec<T, VEC> a = load_vec<T, VEC>(x + o0), b = load_vec<T, VEC>(x + o1);
    float ca[VEC], cb[VEC], sa[VEC], sb[VEC];
    load_floats<C, VEC>(c + o0, ca);
    load_floats<C, VEC>(c + o1, cb);
    load_floats<C, VEC>(s + o0, sa);
    load_floats<C, VEC>(s + o1, sb);
    Vec<T, VEC> ya, yb;
    if (interleaved) {
        // Pairs sit side by side inside each vector.
#pragma unroll
        for (int j = 0; j < VEC; j += 2) {
            if constexpr (VEC >= 2) {
                const float a0 = to_float(a.v[j]), a1 = to_float(a.v[j + 1]);
                const float b0 = to_float(b.v[j]), b1 = to_float(b.v[j + 1]);
                ya.v[j] = from_float<T>(a0 * ca[j] - a1 * sa[j]);
                ya.v[j + 1] = from_float<T>(a1 * ca[j + 1] + a0 * sa[j + 1]);
                yb.v[j] = from_float<T>(b0 * cb[j] - b1 * sb[j]);
                yb.v[j + 1] = from_float<T>(b1 * cb[j + 1] + b0 * sb[j + 1]);
            }
        }
        if constexpr (VEC == 1) {  // scalar path: a and b are the pair itself
            const float a0 = to_float(a.v[0]), b0 = to_float(b.v[0]);
            ya.v[0] = from_float<T>(a0 * ca[0] - b0 * sa[0]);
            yb.v[0] = from_float<T>(b0 * cb[0] + a0 * sb[0]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float a0 = to_float(a.v[j]), b0 = to_float(b.v[j]);
            ya.v[j] = from_float<T>(a0 * ca[j] - b0 * sa[j]);
            yb.v[j] = from_float<T>(b0 * cb[j] + a0 * sb[j]);
        }
    }
    store_vec<T, VEC>(out + o0, ya);
    store_vec<T, VEC>(out + o1, yb);
}

template <typename T, typename C, int VEC, bool INTERLEAVED>
__device__ __forceinline__ void rope_token(const RopeParams& p) {
    const int64_t token = blockIdx.x, b = token / p.seq, s = token % p.seq;
    const int chunks = static_cast<int>(p.head_dim / (2 * VEC));
    const bool cache_mode = p.positions != nullptr;
    int64_t s_out = s;
    if (cache_mode)
        s_out = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[s]
                                  : static_cast<const int32_t*>(p.positions)[s];
    const bool write_kv = s_out >= 0 && (!cache_mode || s_out < p.cache_len);
    const C* c = static_cast<const C*>(p.cos) + b * p.cs_stride[0] + s * p.cs_stride[1];
    const C* sn = static_cast<const C*>(p.sin) + b * p.cs_stride[0] + s * p.cs_stride[1];
    const int heads = static_cast<int>(p.q_heads + p.kv_heads * (p.v_out != nullptr ? 2 : 1));
    for (int i = threadIdx.x; i < heads * chunks; i += blockDim.x) {
        const int h = i / chunks, chunk = i % chunks;
        const int64_t o0 = INTERLEAVED ? 2 * chunk * VEC : chunk * VEC;
        const int64_t o1 = INTERLEAVED ? o0 + VEC : o0 + p.head_dim / 2;
        if (h < p.q_heads) {
            const T* x = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + s * p.q_stride[2];
            T* out = static_cast<T*>(p.q_out) + b * p.q_out_stride[0] + h * p.q_out_stride[1] + s * p.q_out_stride[2];
            rotate_pair<T, C, VEC>(x, out, c, sn, o0, o1, INTERLEAVED);
        } else if (!write_kv) {
            continue;
        } else if (h < p.q_heads + p.kv_heads) {
            const int64_t hk = h - p.q_heads;
            const T* x = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + s * p.k_stride[2];
            T* out = static_cast<T*>(p.k_out) + b * p.k_out_stride[0] + hk * p.k_out_stride[1] + s_out * p.k_out_stride[2];
            rotate_pair<T, C, VEC>(x, out, c, sn, o0, o1, INTERLEAVED);
        } else {
            const int64_t hv = h - p.q_heads - p.kv_heads;
            const T* x = static_cast<const T*>(p.v) + b * p.v_stride[0] + hv * p.v_stride[1] + s * p.v_stride[2];
            T* out = static_cast<T*>(p.v_out) + b * p.v_out_stride[0] + hv * p.v_out_stride[1] + s_out * p.v_out_stride[2];
            store_vec<T, VEC>(out + o0, load_vec<T, VEC>(x + o0));
            store_vec<T, VEC>(out + o1, load_vec<T, VEC>(x + o1));
        }
    }
}

}  // namespace fusedops

#define FUSEDOPS_ROPE_KERNEL(T, C, NAME, SUFFIX, VEC, INTERLEAVED)                                           \
    extern "C" __global__ void __launch_bounds__(kRopeThreads) rope_##NAME##_##SUFFIX(const __grid_constant__ RopeParams p) { \
        fusedops::pdl::enter();                                                                                               \
        fusedops::rope_token<T, C, VEC, INTERLEAVED>(p);                                                     \
    }
// NAME: q/k dtype, and _c32 where cos/sin are fp32
#define FUSEDOPS_ROPE_VARIANTS(T, C, NAME)                          \
    FUSEDOPS_ROPE_KERNEL(T, C, NAME, half_v, fusedops::kVec16<T>, false) \
    FUSEDOPS_ROPE_KERNEL(T, C, NAME, inter_v, fusedops::kVec16<T>, true) \
    FUSEDOPS_ROPE_KERNEL(T, C, NAME, half_s, 1, false)              \
    FUSEDOPS_ROPE_KERNEL(T, C, NAME, inter_s, 1, true)

FUSEDOPS_ROPE_VARIANTS(__nv_bfloat16, __nv_bfloat16, bf16)
FUSEDOPS_ROPE_VARIANTS(__half, __half, fp16)
FUSEDOPS_ROPE_VARIANTS(float, float, fp32)
FUSEDOPS_ROPE_VARIANTS(__nv_bfloat16, float, bf16_c32)
FUSEDOPS_ROPE_VARIANTS(__half, float, fp16_c32)
