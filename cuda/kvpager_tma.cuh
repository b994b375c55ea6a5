// kvpager_tma.cuh: what the kernels that load K/V by TMA share (sm_90 and newer): the
// 128-byte-swizzled (SW128) shared layout's addressing, mbarriers, proxy fences and the
// 2-D TMA load. Include it after kvpager_common.cuh (the loader pastes it; it does not
// nest).
//
// Layout (SW128): a tile of R rows of 16-bit values is stored as D / 64 regions of R
// rows x 128 bytes (64 values of each row per region); within a region row r's 16-byte
// chunk c sits at chunk c ^ (r % 8), so the 8 rows of a 1024-byte atom spread each
// column over all banks. Every region starts on a 1024-byte boundary (the hardware
// applies the swizzle to address bits 4-6 from bits 7-9). A TMA box of the pool's tensor
// map (kvpager/backends/cupy_tma.py: rows of head-dim values, boxes of 64 values,
// 128-byte swizzle) lands in exactly this layout.
#pragma once

// Byte offset of 16-byte chunk ``chunk`` (8 values) of row ``r`` in a SW128 tile of ``rows`` rows.
__device__ __forceinline__ int sw128_offset(int rows, int r, int chunk) {
    return (chunk >> 3) * rows * 128 + r * 128 + (((chunk & 7) ^ (r & 7)) << 4);
}

// Orders this thread's shared-memory accesses of the generic proxy (ordinary loads and stores,
// ldmatrix, cp.async) with those of the async proxy (wgmma operands, TMA writes).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// mbarriers (shared memory, 8 bytes each): init with an arrival count, arrive, and wait until
// the phase of the given parity has completed.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
// The barriers this thread initialised -> visible to the async proxy (TMA's complete_tx).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
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
