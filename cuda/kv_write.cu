// kv_write.cu: store one layer's K and V for a batch of tokens into the paged
// pool, by slot id (slot = block * BLOCK_SIZE + offset; -1 is padding and is
// skipped). One launch per batch; each thread moves 16-byte vectors.
//
// Grid: x = token (grid-stride over num_tokens), 128 threads; the threads of a
// CTA walk the token's K then V vectors, 2 * num_kv_heads * head_dim *
// elem_bytes / 16 of them.
// Element type is irrelevant here: every row is a whole number of 16-byte
// vectors (head_dim * elem_bytes is a multiple of 64).
//
// K and V are read where they lie: head h of token t's K at k + t * k_stride +
// h * k_head (in 16-byte vectors; V likewise), so they may be views of a fused
// projection's output (q, k and v side by side in each token's row, or each
// head's q, k and v side by side) or heads-major memory.
// q_vecs > 0: the CTA also copies each token's query heads (q_vecs vectors, head
// h of token t at q + t * q_stride + h * q_head) into q_out densely, for the
// attention launched after this one (whose kernels read dense rows); padding
// tokens' rows too.
// kv_write_fp8 (built with KV_FP8): the FP8 pool's quantising variant, below.
#include "kvpager_common.cuh"

// Token t's query heads -> row t of q_out, by the CTA's threads.
__device__ __forceinline__ void copy_q_row(const uint4* __restrict__ q, long long q_stride, long long q_head,
                                           uint4* __restrict__ q_out, int q_vecs, int row_vecs, int t) {
    const uint4* src = q + (long long)t * q_stride;
    uint4* dst = q_out + (long long)t * q_vecs;
    for (int i = threadIdx.x; i < q_vecs; i += blockDim.x) {
        const int h = i / row_vecs, c = i - h * row_vecs;
        dst[i] = ld_vec(src + h * q_head + c);
    }
}

extern "C" __global__ void __launch_bounds__(128) kv_write(
    const uint4* __restrict__ k,          // [num_tokens, num_kv_heads, head_dim] at strides k_stride, k_head
    const uint4* __restrict__ v,          // [num_tokens, num_kv_heads, head_dim] at strides v_stride, v_head
    const long long* __restrict__ slots,  // [num_tokens]
    uint4* __restrict__ pool,             // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
    int num_tokens,
    int layer,
    int num_layers,
    int num_kv_heads,
    int block_size,
    int row_vecs,                         // head_dim * elem_bytes / 16
    long long k_stride,                   // vectors from one token's K to the next (dense: num_kv_heads * row_vecs)
    long long k_head,                     // vectors from one head's K to the next (dense: row_vecs)
    long long v_stride,
    long long v_head,
    const uint4* __restrict__ q,          // q_vecs > 0: [num_tokens, q heads, head_dim] at strides q_stride, q_head
    long long q_stride,
    long long q_head,
    uint4* __restrict__ q_out,            // q_vecs > 0: [num_tokens, q_vecs], dense
    int q_vecs)
{
    const int head_vecs = block_size * row_vecs;           // one (block, layer, K|V, head) tile
    const int token_vecs = num_kv_heads * row_vecs;        // one token's K (or V)
    const long long block_vecs = (long long)num_layers * 2 * num_kv_heads * head_vecs;
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        if (q_vecs > 0) copy_q_row(q, q_stride, q_head, q_out, q_vecs, row_vecs, t);
        const long long slot = slots[t];
        if (slot < 0) continue;
        const long long blk = slot / block_size;
        const int off = (int)(slot - blk * block_size);
        uint4* base = pool + blk * block_vecs
                    + (long long)layer * 2 * num_kv_heads * head_vecs + off * row_vecs;
        const uint4* ks = k + (long long)t * k_stride;
        const uint4* vs = v + (long long)t * v_stride;
        for (int i = threadIdx.x; i < 2 * token_vecs; i += blockDim.x) {
            const bool is_v = i >= token_vecs;
            const int j = is_v ? i - token_vecs : i;
            const int h = j / row_vecs, c = j - h * row_vecs;
            const uint4 val = ld_vec(is_v ? vs + h * v_head + c : ks + h * k_head + c);
            st_vec(base + (is_v ? num_kv_heads * head_vecs : 0) + h * head_vecs + c, val);
        }
    }
}

#if KV_FP8
// The FP8 pool: each thread reads a 16-byte vector of k or v (8 compute values),
// divides by the (layer, K|V, head) scale (IEEE division, as the NumPy twin),
// converts with round-to-nearest-even saturated to the finite range and stores
// 8 bytes. The pool rows are head_dim bytes.
extern "C" __global__ void __launch_bounds__(128) kv_write_fp8(
    const uint4* __restrict__ k,          // [num_tokens, num_kv_heads, head_dim] (compute dtype)
    const uint4* __restrict__ v,          // [num_tokens, num_kv_heads, head_dim]
    const long long* __restrict__ slots,  // [num_tokens]
    unsigned char* __restrict__ pool,     // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] FP8
    int num_tokens,
    int layer,
    int num_layers,
    int num_kv_heads,
    int block_size,
    int row_vecs,                         // head_dim / 8: input vectors per row
    long long k_stride,                   // as kv_write's
    long long k_head,
    long long v_stride,
    long long v_head,
    const uint4* __restrict__ q,
    long long q_stride,
    long long q_head,
    uint4* __restrict__ q_out,
    int q_vecs,
    const float* __restrict__ scales)     // [num_layers, 2, num_kv_heads]
{
    const int d = row_vecs * 8;                            // head_dim = bytes of a stored row
    const long long head_bytes = (long long)block_size * d;
    const int token_vecs = num_kv_heads * row_vecs;
    const long long block_bytes = (long long)num_layers * 2 * num_kv_heads * head_bytes;
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        if (q_vecs > 0) copy_q_row(q, q_stride, q_head, q_out, q_vecs, row_vecs, t);
        const long long slot = slots[t];
        if (slot < 0) continue;
        const long long blk = slot / block_size;
        const int off = (int)(slot - blk * block_size);
        unsigned char* base = pool + blk * block_bytes + (long long)layer * 2 * num_kv_heads * head_bytes
                              + (long long)off * d;
        const uint4* ks = k + (long long)t * k_stride;
        const uint4* vs = v + (long long)t * v_stride;
        for (int i = threadIdx.x; i < 2 * token_vecs; i += blockDim.x) {
            const bool is_v = i >= token_vecs;
            const int j = is_v ? i - token_vecs : i;
            const int h = j / row_vecs, c = j - h * row_vecs;
            float f[8];
            vec_to_float(ld_vec(is_v ? vs + h * v_head + c : ks + h * k_head + c), f);
            const float s = scales[(layer * 2 + (is_v ? 1 : 0)) * num_kv_heads + h];
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = __fdiv_rn(f[e], s);
            uint2 w;
            w.x = f32x2_to_fp8x2(f[0], f[1]) | (f32x2_to_fp8x2(f[2], f[3]) << 16);
            w.y = f32x2_to_fp8x2(f[4], f[5]) | (f32x2_to_fp8x2(f[6], f[7]) << 16);
            *reinterpret_cast<uint2*>(base + (is_v ? num_kv_heads * head_bytes : 0) + h * head_bytes + c * 8) = w;
        }
    }
}
#endif
