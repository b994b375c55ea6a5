// kvpager_wgmma.cuh: Hopper warpgroup MMA (wgmma.mma_async, sm_90a) helpers for
// the 16-bit attention kernels: shared-memory matrix descriptors of the
// 128-byte-swizzled layout, the fences and group waits wgmma needs, and the
// m64nNk16 instructions (float32 accumulate) for N = 64 and 128 with both
// operands in shared memory (ss) or A in registers (rs). Include it after
// kvpager_common.cuh and kvpager_mma.cuh (the loader pastes all three; it does
// not nest). Build only for sm_90a: wgmma does not exist on other targets.
//
// Layout (SW128): a tile of R rows of 16-bit values is stored as D / 64 regions
// of R rows x 128 bytes (64 values of each row per region); within a region row
// r's 16-byte chunk c sits at chunk c ^ (r % 8), so the 8 rows of a 1024-byte
// atom spread each column over all banks. Every region starts on a 1024-byte
// boundary (the hardware applies the swizzle to address bits 4-6 from bits 7-9).
// Read as a K-major operand (rows = M or N, the 64 values = K): stride between
// 8-row groups (SBO) 1024 bytes, a k16 step is +32 bytes on the start address,
// the next 64 values of K the next region. Read as an MN-major operand (rows =
// K, the 64 values = N, e.g. V token-major for P V): SBO 1024 bytes between
// 8-row groups of K, LBO = the region size between 64-wide groups of N, a k16
// step is +2048 bytes (16 rows).
#pragma once

#if KV_DTYPE == 1
#define WG_AB "bf16"
#else
#define WG_AB "f16"
#endif

// Byte offset of 16-byte chunk ``chunk`` (8 values) of row ``r`` in a SW128 tile of ``rows`` rows.
__device__ __forceinline__ int sw128_offset(int rows, int r, int chunk) {
    return (chunk >> 3) * rows * 128 + r * 128 + (((chunk & 7) ^ (r & 7)) << 4);
}

// A wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading and
// stride byte offsets (all >> 4), base offset 0 (regions 1024-byte aligned).
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3ffffu) >> 4)
         | ((unsigned long long)((lbo & 0x3ffffu) >> 4) << 16)
         | ((unsigned long long)((sbo & 0x3ffffu) >> 4) << 32)
         | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// Ordinary (generic-proxy) writes to shared memory -> visible to wgmma's async-proxy reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// mbarriers (shared memory, 8 bytes each): init with an arrival count, arrive, and wait until
// the phase of the given parity has completed.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// Arrive at the mbarrier once every cp.async this thread issued so far has landed, without
// waiting (noinc: the arrival is one of the count the barrier was initialised with).
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
// Arrive at the mbarrier (one of its count) and add ``bytes`` to the transactions its phase
// waits for (the TMA copies below complete them).
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
// TMA: the 2-D box of the tensor map ``map`` (the generic address of a CUtensorMap in global
// memory) at element coordinates (c0 innermost, c1) -> shared memory at ``dst``, laid out
// (and swizzled) as the map says; its bytes complete transactions of the mbarrier ``bar``.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
// Registers of this warpgroup's threads handed back to / taken from the CTA's pool (warp
// specialisation: a producer needs few, the MMA warpgroups many). Multiples of 8, 24-256.
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(R)); }
// A barrier of ``count`` threads (a multiple of 32) on hardware barrier ``id`` (0 is __syncthreads').
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}
// Arrive at hardware barrier ``id`` without waiting (its ``count`` includes the threads that
// wait there with named_barrier_sync).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across an asynchronous MMA's issue or wait.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i]) :: "memory");
}

// The m64nN k16 instructions, written once and stamped for N = 64 and 128 by WG_STAMP. Inline
// asm numbers its operands by position: the N / 2 accumulator registers of each thread
// (%0 ..), then the inputs, whose numbers (O0 .. O5) therefore depend on N.
// WG_ACC_N: the accumulators' operand list; WG_OUT_N(d): their constraints, "+f"(d[0]) ...
#define WG_ACC_64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_ACC_128 WG_ACC_64 ", " \
                   "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                   "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_F8(d, i) "+f"((d)[(i)]), "+f"((d)[(i) + 1]), "+f"((d)[(i) + 2]), "+f"((d)[(i) + 3]), \
                    "+f"((d)[(i) + 4]), "+f"((d)[(i) + 5]), "+f"((d)[(i) + 6]), "+f"((d)[(i) + 7])
#define WG_OUT_64(d) WG_F8(d, 0), WG_F8(d, 8), WG_F8(d, 16), WG_F8(d, 24)
#define WG_OUT_128(d) WG_OUT_64(d), WG_F8(d, 32), WG_F8(d, 40), WG_F8(d, 48), WG_F8(d, 56)

// wgmma_ss_N: d (m64nN f32) = (scale_d 0) or += A (64 x 16, shared, K-major) * B (16 x N,
// shared, K-major: N rows of 16 values of K). a, b, scale_d are operands O0, O1, O2.
// wgmma_rs_N: d += A (64 x 16, registers: four per thread) * B (16 x N, shared, MN-major,
// transposed: the trailing 1). a[0..3] are O0 .. O3, b O4, the (always 1) scale-d O5.
#define WG_STAMP(N, O0, O1, O2, O3, O4, O5)                                                              \
__device__ __forceinline__ void wgmma_ss_##N(float* d, unsigned long long a, unsigned long long b,      \
                                             int scale_d) {                                            \
    asm volatile(                                                                                       \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %" #O2 ", 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." WG_AB "." WG_AB " "                            \
        "{" WG_ACC_##N "}, %" #O0 ", %" #O1 ", p, 1, 1, 0, 0;\n}\n"                                      \
        : WG_OUT_##N(d)                                                                                 \
        : "l"(a), "l"(b), "r"(scale_d));                                                                \
}                                                                                                       \
__device__ __forceinline__ void wgmma_rs_##N(float* d, const unsigned* a, unsigned long long b) {      \
    asm volatile(                                                                                       \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %" #O5 ", 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." WG_AB "." WG_AB " "                            \
        "{" WG_ACC_##N "}, {%" #O0 ", %" #O1 ", %" #O2 ", %" #O3 "}, %" #O4 ", p, 1, 1, 1;\n}\n"         \
        : WG_OUT_##N(d)                                                                                 \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));                                  \
}

WG_STAMP(64, 32, 33, 34, 35, 36, 37)
WG_STAMP(128, 64, 65, 66, 67, 68, 69)

#undef WG_STAMP
#undef WG_OUT_128
#undef WG_OUT_64
#undef WG_F8
#undef WG_ACC_128
#undef WG_ACC_64

template <int N>
__device__ __forceinline__ void wgmma_ss(float* d, unsigned long long a, unsigned long long b, int scale_d) {
    static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
    if constexpr (N == 64) wgmma_ss_64(d, a, b, scale_d);
    else wgmma_ss_128(d, a, b, scale_d);
}

// d (m64nN f32) += A (64 x 16, registers: the mma.sync m16n8k16 A fragment of each warp's
// 16 rows) * B (16 x N, shared, MN-major: rows of K holding N contiguous values).
template <int N>
__device__ __forceinline__ void wgmma_rs(float* d, const unsigned* a, unsigned long long b) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
    if constexpr (N == 64) wgmma_rs_64(d, a, b);
    else wgmma_rs_128(d, a, b);
}
