// block_copy.cu: copy whole pool blocks (all layers, K and V) for
// copy-on-write: dst[pairs[i].dst] = src[pairs[i].src] for every pair, in one
// launch. A block is one contiguous chunk of block_vecs 16-byte vectors in the
// block-major layout, so this is a batched memcpy with 16-byte loads and
// stores, UNROLL of them in flight per thread (the loader passes -DUNROLL).
//
// Grid: x = chunk of a block (each CTA of 256 threads moves 256 * UNROLL
// vectors per step and strides over the block by gridDim.x chunks),
// y = pair (strides over num_pairs by gridDim.y).
#include "kvpager_common.cuh"

#define COPY_THREADS 256
#ifndef UNROLL
#define UNROLL 16
#endif

extern "C" __global__ void __launch_bounds__(COPY_THREADS) copy_blocks(
    const uint4* __restrict__ src,        // [num_blocks, block_vecs] (the pool)
    uint4* __restrict__ dst,              // [num_blocks, block_vecs] (the same pool)
    const long long* __restrict__ pairs,  // [num_pairs, 2]: (src block, dst block)
    int num_pairs,
    long long block_vecs)
{
    const long long step = (long long)gridDim.x * COPY_THREADS * UNROLL;
    for (int p = blockIdx.y; p < num_pairs; p += gridDim.y) {
        const uint4* s = src + pairs[2 * p] * block_vecs;
        uint4* d = dst + pairs[2 * p + 1] * block_vecs;
        for (long long base = (long long)blockIdx.x * COPY_THREADS * UNROLL + threadIdx.x;
             base < block_vecs; base += step) {
            uint4 r[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = base + u * COPY_THREADS;
                if (i < block_vecs) r[u] = ld_stream(s + i);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long i = base + u * COPY_THREADS;
                if (i < block_vecs) st_vec(d + i, r[u]);
            }
        }
    }
}
