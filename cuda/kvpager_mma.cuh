// kvpager_mma.cuh: tensor-core helpers shared by the float16 / bfloat16
// attention kernels: cp.async (16 bytes, zero-fill), ldmatrix and
// mma.sync m16n8k16 with float32 accumulate (sm_80 and later). Include it
// after kvpager_common.cuh (the loader pastes both; it does not nest).
#pragma once

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is not read).
// CP_L2_PREFETCH (128 or 256) adds an L2 prefetch-size hint to each copy; CP_EVICT_FIRST an
// L2 evict-first policy (K/V a kernel reads once: its lines are the first L2 gives back).
#ifndef CP_L2_PREFETCH
#define CP_L2_PREFETCH 0
#endif
#ifndef CP_EVICT_FIRST
#define CP_EVICT_FIRST 0
#endif
#if CP_L2_PREFETCH == 256
#define CP_PREFETCH ".L2::256B"
#elif CP_L2_PREFETCH == 128
#define CP_PREFETCH ".L2::128B"
#else
#define CP_PREFETCH ""
#endif
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if CP_EVICT_FIRST
    asm volatile("{\n.reg .b64 pol;\ncreatepolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
                 "cp.async.cg.shared.global.L2::cache_hint" CP_PREFETCH " [%0], [%1], 16, %2, pol;\n}\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
    asm volatile("cp.async.cg.shared.global" CP_PREFETCH " [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c += a * b: a 16x16 (row), b 16x8 (col), c 16x8 float32. The operands are bfloat16 for a
// bfloat16 pool, float16 for a float16 pool and for every FP8 pool (see kvpager_common.cuh).
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if KV_DTYPE == 1 && !KV_FP8
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#if KV_FP8
// FP8 operands. A K tile row holds 16 FP8 dims per 16-byte chunk; ldmatrix (b16) gives a lane
// dims 4 tig .. 4 tig + 3 of token gid, so the k order of Q K^T is permuted: mma k-slots
// (2 tig, 2 tig + 1) take dims (4 tig, 4 tig + 1) and slots (2 tig + 8, 2 tig + 9) dims
// (4 tig + 2, 4 tig + 3); Q's A fragment is loaded in the same order (a dot product does not
// care). c += a * K^T for one 16-dim chunk, r: the lane's ldmatrix word of that chunk.
__device__ __forceinline__ void mma_fp8_k(float* c, const unsigned* a, unsigned r) {
    mma16816(c, a, fp8x2_to_f16x2(r & 0xffffu), fp8x2_to_f16x2(r >> 16));
}
// P V for one 16-dim chunk of V from ldmatrix.trans words (b16 units = FP8 pairs): r0 holds
// V[2 tig][2 gid], V[2 tig][2 gid + 1], V[2 tig + 1][2 gid], V[2 tig + 1][2 gid + 1] (tokens
// 0-7), r1 the same for tokens 8-15. The even dims go to ce, the odd to co, so output column
// j of ce is dim 2 j of the chunk and of co dim 2 j + 1: a lane holds dims 4 tig .. 4 tig + 3
// as ce[0], co[0], ce[1], co[1] (rows gid; [2], [3] for gid + 8).
__device__ __forceinline__ void mma_fp8_v(float* ce, float* co, const unsigned* pa, unsigned r0, unsigned r1) {
    const unsigned p0 = __byte_perm(r0, 0u, 0x3120), p1 = __byte_perm(r1, 0u, 0x3120);
    mma16816(ce, pa, fp8x2_to_f16x2(p0 & 0xffffu), fp8x2_to_f16x2(p1 & 0xffffu));
    mma16816(co, pa, fp8x2_to_f16x2(p0 >> 16), fp8x2_to_f16x2(p1 >> 16));
}

// A bfloat16x2 word (lo in the low half) times 2^p -> float16x2.
__device__ __forceinline__ unsigned bf16x2_to_f16x2(unsigned w, float mul) {
    return pack2_f16(__uint_as_float(w << 16) * mul, __uint_as_float(w & 0xffff0000u) * mul);
}
#define pack2_mma pack2_f16  // P's A fragments
#else
#define pack2_mma pack2
#endif
