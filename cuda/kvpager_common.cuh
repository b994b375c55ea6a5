// kvpager_common.cuh: element types and small device helpers shared by the
// kvpager kernels. The loader pastes this file into each source that includes
// it (so CuPy's on-disk cache, keyed by source text, sees header changes);
// nvcc finds it through -I cuda.
//
// No CUDA headers are included: half and bfloat16 values are kept as raw
// 16-bit words and converted with PTX, so the sources build the same way with
// NVRTC (CuPy) and with nvcc.
#pragma once

#ifndef KV_DTYPE
#define KV_DTYPE 1  // 0 float16, 1 bfloat16, 2 float32
#endif

#if KV_DTYPE == 2
typedef float kv_t;
#define KV_BYTES 4
#else
typedef unsigned short kv_t;  // raw float16 / bfloat16 bits
#define KV_BYTES 2
#endif
#define VEC_ELEMS (16 / KV_BYTES)  // elements in one 16-byte vector

// Storage of the pool: the compute type, or FP8 (KV_FP8 = 1: e4m3, 2: e5m2) with
// per-(layer, K|V, kv head) float32 scales (stored = x / scale, read = stored * scale).
#ifndef KV_FP8
#define KV_FP8 0
#endif
#if KV_FP8
#if KV_DTYPE == 2
#error "FP8 storage needs float16 or bfloat16 compute (KV_DTYPE 0 or 1)"
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "FP8 conversions (cvt ... e4m3x2 / e5m2x2) need sm_89 or later"
#endif
typedef unsigned char st_t;  // raw FP8 bits
#define ST_BYTES 1
#else
typedef kv_t st_t;
#define ST_BYTES KV_BYTES
#endif
#define ST_VEC (16 / ST_BYTES)  // stored elements in one 16-byte vector

#define NEG_INF (-__int_as_float(0x7f800000))

// Programmatic dependent launch (compute capability 9.0 and later; nothing elsewhere, and
// nothing for kernels launched plainly): pdl_launch_dependents lets the next kernel of the
// stream, launched programmatically (kvpager.launch.Launch), start before this one ends;
// pdl_wait, in that next kernel, waits until the kernel before it has finished and its
// writes are visible.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_float(kv_t x) {
#if KV_DTYPE == 2
    return x;
#elif KV_DTYPE == 1
    return __uint_as_float(((unsigned)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ kv_t from_float(float f) {
#if KV_DTYPE == 2
    return f;
#else
    unsigned short h;
#if KV_DTYPE == 1
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
#endif
}

#if KV_DTYPE != 2
// Two floats -> one 32-bit word of two 16-bit values, lo in the low half.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
#if KV_DTYPE == 1
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// One 32-bit word of two 16-bit values -> two floats.
__device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
#if KV_DTYPE == 1
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
#else
    lo = to_float((kv_t)(w & 0xffffu));
    hi = to_float((kv_t)(w >> 16));
#endif
}
#endif

#if KV_FP8
// Two FP8 values (lo byte first) -> float16x2, exact (every e4m3 / e5m2 value is a float16).
__device__ __forceinline__ unsigned fp8x2_to_f16x2(unsigned w) {
    unsigned r;
    const unsigned short h = (unsigned short)w;
#if KV_FP8 == 1
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
#else
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(r) : "h"(h));
#endif
    return r;
}

// Two floats -> float16x2 (lo in the low half).
__device__ __forceinline__ unsigned pack2_f16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// With an FP8 pool the attention MMAs run on float16 operands whatever the compute type:
// FP8 -> float16 is one exact conversion per pair (bfloat16 would take three), P in [0, 1]
// is finer in float16, and a bfloat16 q is brought into float16's range by a power of two
// (q_range_exp), undone on the scores.
// The exponent p of the power of two 2^p that brings |q| <= amax just under 2^15 (float16's
// largest finite value is 65504): q * 2^p is then exact in float16 down to 2^-14 (bfloat16
// has 8 significant bits). amax 0 or not finite: p = 0.
__device__ __forceinline__ int q_range_exp(float amax) {
    if (!(amax > 0.f) || amax > 3.0e38f) return 0;
    const int e = (__float_as_int(amax) >> 23) & 0xff;  // amax < 2^(e - 126)
    return max(-100, min(100, 141 - e));
}
__device__ __forceinline__ float exp2i(int p) { return __int_as_float((p + 127) << 23); }  // |p| <= 126

// Two floats -> two FP8 values in a 16-bit word (lo byte first): round to nearest even,
// saturated to the largest finite value (NaN stays NaN).
__device__ __forceinline__ unsigned f32x2_to_fp8x2(float lo, float hi) {
    unsigned short r;
#if KV_FP8 == 1
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
#endif

// A 16-byte vector -> VEC_ELEMS floats.
__device__ __forceinline__ void vec_to_float(const uint4& v, float* f) {
#if KV_DTYPE == 2
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
#else
    unpack2(v.x, f[0], f[1]); unpack2(v.y, f[2], f[3]);
    unpack2(v.z, f[4], f[5]); unpack2(v.w, f[6], f[7]);
#endif
}

// Read-only 16-byte global load that skips L1 (K/V are streamed once).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_vec(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void st_vec(void* p, const uint4& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Where kv head h of a layer sits in the pool ([num_blocks, num_layers, 2, num_kv_heads,
// BLOCK_SIZE, head dim]), in elements, for heads of ``head_block`` (BLOCK_SIZE x head dim)
// elements a block: a block's stride, and the head's K and V rows within a block.
struct PoolHead {
    long long block_stride, k_off, v_off;
};

__device__ __forceinline__ PoolHead pool_head(int layer, int num_layers, int num_kv_heads, int h, int head_block) {
    const long long k_off = ((long long)layer * 2 * num_kv_heads + h) * head_block;
    return {(long long)num_layers * 2 * num_kv_heads * head_block, k_off, k_off + (long long)num_kv_heads * head_block};
}
