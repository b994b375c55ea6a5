// block_copy.cu: copy whole pool blocks (all layers, K and V) for
// copy-on-write: dst[pairs[i].dst] = src[pairs[i].src] for every pair, in one
// launch. A block is one contiguous chunk of block_vecs 16-byte vectors in the
// block-major layout, so this is a batched memcpy with 16-byte loads and
// stores, UNROLL of them in flight per thread (the loader passes -DUNROLL).
//
// Work is cut into items of COPY_THREADS * UNROLL vectors: item i is chunk
// i % chunks_per_block of pair i / chunks_per_block. Grid: 1-D, one CTA per
// item (destinations are distinct, so the items number at most the pool's
// bytes / (16 * COPY_THREADS * UNROLL)). A persistent grid walking the items
// measured no better (docs/gpu-notes.md, v1).
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
    constexpr int SEG = COPY_THREADS * UNROLL;
    const long long cpb = (block_vecs + SEG - 1) / SEG;  // chunks per block
    const long long it = blockIdx.x;
    if (it >= (long long)num_pairs * cpb) return;
    const long long p = it / cpb;
    const long long base = (it - p * cpb) * SEG + threadIdx.x;
    const uint4* s = src + __ldg(pairs + 2 * p) * block_vecs;
    uint4* d = dst + __ldg(pairs + 2 * p + 1) * block_vecs;
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
