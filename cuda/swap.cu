// swap.cu: move whole blocks between the device pool and the pinned host
// (swap) pool in one launch each way. The host pool is cudaHostAlloc'ed with
// cudaHostAllocMapped; the kernel gets its device-side address
// (cudaHostGetDevicePointer), so the copy runs as PCIe reads or writes issued
// by the SMs: one launch for any number of scattered blocks, instead of one
// cudaMemcpyAsync per block.
//
// swap_blocks(src, dst, pairs): dst[pairs[i].1] = src[pairs[i].0]; swap out
// passes (device pool, host pool), swap in (host pool, device pool).
// Grid: x = chunk of a block (256 threads, UNROLL 16-byte vectors each in
// flight per step, striding over the block), y = pair (striding over
// num_pairs). Many loads in flight matter most for swap in, where each read
// crosses PCIe.
#include "kvpager_common.cuh"

#define SWAP_THREADS 256
#define UNROLL 8

extern "C" __global__ void __launch_bounds__(SWAP_THREADS) swap_blocks(
    const uint4* __restrict__ src,        // [src_blocks, block_vecs]: device pool or mapped host pool
    uint4* __restrict__ dst,              // [dst_blocks, block_vecs]: the other one
    const long long* __restrict__ pairs,  // [num_pairs, 2]: (src block, dst block)
    int num_pairs,
    long long block_vecs)
{
    const long long step = (long long)gridDim.x * SWAP_THREADS * UNROLL;
    for (int p = blockIdx.y; p < num_pairs; p += gridDim.y) {
        const uint4* s = src + pairs[2 * p] * block_vecs;
        uint4* d = dst + pairs[2 * p + 1] * block_vecs;
        for (long long base = (long long)blockIdx.x * SWAP_THREADS * UNROLL + threadIdx.x;
             base < block_vecs; base += step) {
            uint4 r[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = base + u * SWAP_THREADS;
                if (i < block_vecs) r[u] = ld_vec(s + i);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = base + u * SWAP_THREADS;
                if (i < block_vecs) st_vec(d + i, r[u]);
            }
        }
    }
}
