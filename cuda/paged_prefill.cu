// paged_prefill.cu: multi-token paged attention (prefill, chunked prefill on
// top of a cached prefix), causal, float16 / bfloat16 on tensor cores
// (mma.sync m16n8k16, float32 accumulate).
//
// Query token j of sequence b sits at position seq_len - query_len + j and
// sees K/V positions <= its own. A CTA owns one query tile of BM = 64 rows,
// where row r is (query token j0 + r / GROUP, query head kv_head * GROUP +
// r % GROUP): all heads of a GQA group share the tile, so each K/V tile is
// loaded once for them. The 4 warps own 16 rows each and walk the sequence's
// K/V in tiles of BN tokens, staged in shared memory by cp.async (16 bytes,
// two stages, rows past the end zero-filled) and read with ldmatrix;
// S = Q K^T and O += P V run on mma.sync with an online softmax (exp2) in
// registers between them.
//
// Grid: x = query tile (from the tiles list built by the planner), y = kv head.
// Dynamic shared memory: (BM + 4 * BN) * (HEAD_DIM + 8) * 2 bytes (rows padded
// by 16 bytes so ldmatrix rows fall in different banks).
#include "kvpager_common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef GROUP
#define GROUP 4
#endif

#if KV_DTYPE == 2
#error "paged_prefill.cu is for float16 / bfloat16; float32 uses paged_decode.cu per query token"
#endif

constexpr int D = HEAD_DIM;
constexpr int BM = 64;
constexpr int BN = D > 128 ? 32 : 64;
constexpr int LD = D + 8;           // padded smem row, in elements
constexpr int QT = BM / GROUP;      // query tokens per tile
constexpr int NT = 128;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c += a * b: a 16x16 (row), b 16x8 (col), c 16x8 float32.
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if KV_DTYPE == 1
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

extern "C" __global__ void __launch_bounds__(NT) paged_prefill(
    const kv_t* __restrict__ q,             // [total_query_tokens, num_q_heads, HEAD_DIM]
    const kv_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ seq_lens,       // [num_seqs]
    const int* __restrict__ query_lens,     // [num_seqs]
    const int* __restrict__ q_start,        // [num_seqs]: first row of each sequence in q / out
    const int* __restrict__ tiles,          // [num_tiles, 2]: (sequence, first query token)
    kv_t* __restrict__ out,                 // [total_query_tokens, num_q_heads, HEAD_DIM]
    int layer, int num_layers, int num_kv_heads, int max_blocks, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    kv_t* Qs = reinterpret_cast<kv_t*>(smem_raw);   // [BM][LD]
    kv_t* Ks = Qs + BM * LD;                          // [2][BN][LD]
    kv_t* Vs = Ks + 2 * BN * LD;                      // [2][BN][LD]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int b = tiles[2 * blockIdx.x], j0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;
    const int seq_len = seq_lens[b], qlen = query_lens[b];
    const int qpos0 = seq_len - qlen;          // position of query token 0
    const long long qrow0 = q_start[b];
    const int last_tok = min(j0 + QT, qlen) - 1;
    const int kv_end = qpos0 + last_tok + 1;   // K/V positions this tile can see
    const int num_tiles = (kv_end + BN - 1) / BN;

    const int* table = block_tables + (long long)b * max_blocks;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * D;
    const long long k_off = ((long long)layer * 2 * num_kv_heads + h) * BLOCK_SIZE * D;
    const long long v_off = k_off + (long long)num_kv_heads * BLOCK_SIZE * D;
    constexpr int CPR = D / 8;  // 16-byte chunks per row

    // Q tile -> smem (rows past the sequence's queries zero-filled).
    for (int c = tid; c < BM * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int tok = j0 + r / GROUP;
        const bool ok = tok < qlen;
        const kv_t* src = ok ? q + ((qrow0 + tok) * num_q_heads + h * GROUP + r % GROUP) * D + col : q;
        cp_async16(Qs + r * LD + col, src, ok);
    }
    auto load_kv = [&](int t, int stage) {
        kv_t* ks = Ks + stage * BN * LD;
        kv_t* vs = Vs + stage * BN * LD;
        for (int c = tid; c < BN * CPR; c += NT) {
            const int r = c / CPR, col = (c % CPR) * 8;
            const int pos = t * BN + r;
            const bool ok = pos < kv_end;
            long long row = 0;
            if (ok) row = (long long)table[pos / BLOCK_SIZE] * block_stride + (pos % BLOCK_SIZE) * D + col;
            cp_async16(ks + r * LD + col, pool + (ok ? row + k_off : 0), ok);
            cp_async16(vs + r * LD + col, pool + (ok ? row + v_off : 0), ok);
        }
    };
    load_kv(0, 0);
    cp_commit();

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    // The query positions of this thread's two rows (-1: padding row, sees nothing).
    const int r0 = warp * 16 + gid, r1 = r0 + 8;
    const int tok0 = j0 + r0 / GROUP, tok1 = j0 + r1 / GROUP;
    const int p0 = tok0 < qlen ? qpos0 + tok0 : -1;
    const int p1 = tok1 < qlen ? qpos0 + tok1 : -1;

    for (int t = 0; t < num_tiles; ++t) {
        if (t + 1 < num_tiles) load_kv(t + 1, (t + 1) & 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const kv_t* ks = Ks + (t & 1) * BN * LD;
        const kv_t* vs = Vs + (t & 1) * BN * LD;

        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4];
            ldsm_x4(a, Qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                unsigned bk[4];
                const int mi = lane >> 3;
                ldsm_x4(bk, ks + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * LD + kk * 16 + (mi & 1) * 8);
                mma16816(s[2 * np], a, bk[0], bk[1]);
                mma16816(s[2 * np + 1], a, bk[2], bk[3]);
            }
        }
        // Scale into the log2 domain, mask (causal and padding), row max.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kp = t * BN + n * 8 + tig * 2 + e;
                s[n][e] = kp <= p0 ? s[n][e] * scale_log2 : NEG_INF;
                s[n][2 + e] = kp <= p1 ? s[n][2 + e] * scale_log2 : NEG_INF;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float u0 = mx0 == NEG_INF ? 0.f : mx0, u1 = mx1 == NEG_INF ? 0.f : mx1;
        const float c0 = exp2f(m0 - u0), c1 = exp2f(m1 - u1);
        m0 = mx0; m1 = mx1;
        l0 *= c0; l1 *= c1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= c0; o[n][1] *= c0; o[n][2] *= c1; o[n][3] *= c1;
        }
        // P = exp2(S - m), packed straight into A fragments for P V.
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            const float e0 = exp2f(s[n][0] - u0), e1 = exp2f(s[n][1] - u0);
            const float e2 = exp2f(s[n][2] - u1), e3 = exp2f(s[n][3] - u1);
            l0 += e0 + e1; l1 += e2 + e3;
            pa[n >> 1][(n & 1) * 2 + 0] = pack2(e0, e1);
            pa[n >> 1][(n & 1) * 2 + 1] = pack2(e2, e3);
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                unsigned bv[4];
                const int mi = lane >> 3;
                ldsm_x4_t(bv, vs + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * LD + np * 16 + (mi >> 1) * 8);
                mma16816(o[2 * np], pa[kk], bv[0], bv[1]);
                mma16816(o[2 * np + 1], pa[kk], bv[2], bv[3]);
            }
        }
        __syncthreads();  // this stage is refilled next iteration
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (p0 >= 0) {
        unsigned* dst = reinterpret_cast<unsigned*>(
            out + ((qrow0 + tok0) * num_q_heads + h * GROUP + r0 % GROUP) * D);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) dst[n * 4 + tig] = pack2(o[n][0] * inv0, o[n][1] * inv0);
    }
    if (p1 >= 0) {
        unsigned* dst = reinterpret_cast<unsigned*>(
            out + ((qrow0 + tok1) * num_q_heads + h * GROUP + r1 % GROUP) * D);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) dst[n * 4 + tig] = pack2(o[n][2] * inv1, o[n][3] * inv1);
    }
}
