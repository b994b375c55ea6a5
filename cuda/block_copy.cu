// block_copy.cu: copy whole pool blocks (all layers, K and V) for
// copy-on-write: dst[pairs[i].dst] = src[pairs[i].src] for every pair, in one
// launch. A block is one contiguous chunk of block_vecs 16-byte vectors in the
// block-major layout, so this is a batched memcpy with 16-byte loads and
// stores, UNROLL of them in flight per thread (the loader passes -DUNROLL).
//
// Work is cut into items of COPY_THREADS * UNROLL vectors: item i is chunk
// i % chunks_per_block of pair i / chunks_per_block. Grid: 1-D; CTA b takes
// items b, b + gridDim.x, ... (the loader launches a few CTAs per SM, so the
// CTAs stay resident and walk all the pairs, with the next item's pair
// fetched while the current one is copied; a grid of one CTA per item works
// too).
#include "kvpager_common.cuh"

#define COPY_THREADS 256
#ifndef UNROLL
#define UNROLL 8
#endif

extern "C" __global__ void __launch_bounds__(COPY_THREADS) copy_blocks(
    const uint4* __restrict__ src,        // [num_blocks, block_vecs] (the pool)
    uint4* __restrict__ dst,              // [num_blocks, block_vecs] (the same pool)
    const long long* __restrict__ pairs,  // [num_pairs, 2]: (src block, dst block)
    int num_pairs,
    long long block_vecs)
{
    constexpr int SEG = COPY_THREADS * UNROLL;
    const long long cpb = (block_vecs + SEG - 1) / SEG;  // chunks per block
    const long long items = (long long)num_pairs * cpb;
    long long it = blockIdx.x;
    long long ps = 0, pd = 0;
    if (it < items) {
        const long long p = it / cpb;
        ps = __ldg(pairs + 2 * p);
        pd = __ldg(pairs + 2 * p + 1);
    }
    for (; it < items; it += gridDim.x) {
        const long long p = it / cpb;
        const long long base = (it - p * cpb) * SEG + threadIdx.x;
        const uint4* s = src + ps * block_vecs;
        uint4* d = dst + pd * block_vecs;
        const long long nx = it + gridDim.x;
        if (nx < items) {  // the next item's pair, in flight during this copy
            const long long np = nx / cpb;
            ps = __ldg(pairs + 2 * np);
            pd = __ldg(pairs + 2 * np + 1);
        }
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
