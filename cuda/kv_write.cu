// kv_write.cu: store one layer's K and V for a batch of tokens into the paged
// pool, by slot id (slot = block * BLOCK_SIZE + offset; -1 is padding and is
// skipped). One launch per batch; each thread moves 16-byte vectors.
//
// Grid: x = token (grid-stride over num_tokens), 128 threads; the threads of a
// CTA walk the token's K then V vectors, 2 * num_kv_heads * head_dim *
// elem_bytes / 16 of them.
// Element type is irrelevant here: every row is a whole number of 16-byte
// vectors (head_dim * elem_bytes is a multiple of 64).
#include "kvpager_common.cuh"

extern "C" __global__ void __launch_bounds__(128) kv_write(
    const uint4* __restrict__ k,          // [num_tokens, num_kv_heads, head_dim]
    const uint4* __restrict__ v,          // [num_tokens, num_kv_heads, head_dim]
    const long long* __restrict__ slots,  // [num_tokens]
    uint4* __restrict__ pool,             // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
    int num_tokens,
    int layer,
    int num_layers,
    int num_kv_heads,
    int block_size,
    int row_vecs)                         // head_dim * elem_bytes / 16
{
    const int head_vecs = block_size * row_vecs;           // one (block, layer, K|V, head) tile
    const int token_vecs = num_kv_heads * row_vecs;        // one token's K (or V)
    const long long block_vecs = (long long)num_layers * 2 * num_kv_heads * head_vecs;
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        const long long slot = slots[t];
        if (slot < 0) continue;
        const long long blk = slot / block_size;
        const int off = (int)(slot - blk * block_size);
        uint4* base = pool + blk * block_vecs
                    + (long long)layer * 2 * num_kv_heads * head_vecs + off * row_vecs;
        const uint4* ks = k + (long long)t * token_vecs;
        const uint4* vs = v + (long long)t * token_vecs;
        for (int i = threadIdx.x; i < 2 * token_vecs; i += blockDim.x) {
            const bool is_v = i >= token_vecs;
            const int j = is_v ? i - token_vecs : i;
            const int h = j / row_vecs, c = j - h * row_vecs;
            const uint4 val = ld_vec(is_v ? vs + j : ks + j);
            st_vec(base + (is_v ? num_kv_heads * head_vecs : 0) + h * head_vecs + c, val);
        }
    }
}
