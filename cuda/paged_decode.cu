// paged_decode.cu: paged attention on CUDA cores, one query token per work
// item (decode, and multi-token as one item per query token), over the
// block-major pool, with split-K over long contexts: float32 pools. float16 /
// bfloat16 (and FP8) pools attend on tensor cores in paged_decode_tc.cu and the
// multi-token kernels: this kernel's 16-bit build measured 0.78-0.84x of
// paged_decode_tc.cu at head dim 128 (docs/gpu-notes.md, v1), and at head dim 512
// 64-66% of 4.8 TB/s against the tensor cores' 91-94% (v27, v29).
//
// Work item i has query row i (q[i]), reads the K/V of sequence item_seq[i]
// up to item_len[i] tokens (positions [0, item_len[i])), and attends with
// every query head of its kv head's GQA group. Decode uses one item per
// sequence; the multi-token path uses one item per query token with
// item_len = its position + 1 (causal).
//
// Grid: x = (item, kv head, head subgroup) with the subgroup fastest, y =
// split. A CTA (4 warps) handles SUBGROUP query heads of one kv head over
// its split's token range, so each K/V row is read once for all of them
// (SUBGROUP = GROUP while a lane's q and accumulator fit in 64 registers, 8
// heads at head dim 128; larger groups are cut into subgroups whose CTAs run
// side by side and share the K/V reads through L2).
// Inside a warp, LPR lanes share a K/V row (16-byte loads, one row of
// head_dim elements per LPR lanes, rows of a warp contiguous in memory); each
// lane keeps its dims of q and of the output accumulator for SUBGROUP heads in
// registers. Online softmax in float32 with exp2 (q is pre-scaled by
// scale * log2(e)), rescaling lazily; warps merge at the end through shared memory.
// With parts == 0 (one split, no shared prefix) the CTA writes the
// normalised output; otherwise it writes a float32 partial output and its
// log2-sum-exp into slot ``split`` of ``parts`` per row, and merge_splits
// (merge_splits.cu) combines the slots. item_start (optional): the first
// position each item reads, past a shared prefix attended elsewhere into the
// slots num_splits .. parts - 1 (which split 0 marks empty first; kvpager
// cascades only 16-bit pools, so it passes none here).
//
// window > 0 (sliding window): the item sees only positions
// [item_len - window, item_len); the splits cover that range, from the
// multiple of 16 below its start (the rows before it are masked). softcap > 0:
// scores s (log2 units) become softcap * tanh(s / softcap), so the host passes
// the cap times log2(e).
#ifndef KV_DTYPE
#define KV_DTYPE 2  // float32
#endif
#include "kvpager_common.cuh"

#if KV_DTYPE != 2
#error "paged_decode.cu is for float32 pools; float16 / bfloat16 pools decode in paged_decode_tc.cu"
#endif

#if KV_FP8
#error "paged_decode.cu reads float32 pools; FP8 pools decode in paged_decode_tc.cu"
#endif

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef SUBGROUP
#define SUBGROUP 4
#endif

#define NWARPS 4
#define NTHREADS (NWARPS * 32)
#ifndef CH
#define CH 4  // rows per lane group per iteration: 2*CH 16-byte loads per lane per iteration
#endif

constexpr int D = HEAD_DIM;
constexpr int NV = D * KV_BYTES / 16;  // 16-byte vectors per row
constexpr int LPR = NV <= 4 ? 4 : NV <= 8 ? 8 : NV <= 16 ? 16 : 32;  // lanes per row
constexpr int VPL = (NV + LPR - 1) / LPR;  // vectors per lane per row
constexpr int RPW = 32 / LPR;              // rows per warp step
constexpr int ROWS_PER_ITER = RPW * CH;
constexpr int GS = SUBGROUP;
constexpr int E = VEC_ELEMS;

// Block ids of the CH rows this lane group reads in the iteration starting at base.
__device__ __forceinline__ void lookup_blocks(const int* __restrict__ table, int base, int lo, int end,
                                              int rg, int (&blk)[CH]) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int pos = base + c * RPW + rg;
        blk[c] = pos < end && pos >= lo ? __ldg(table + pos / BLOCK_SIZE) : 0;
    }
}

// This lane's 16-byte vectors of the K and V rows of that iteration (zeros outside [lo, end):
// the rows before a window's start may sit in blocks that are not to be read).
__device__ __forceinline__ void load_rows(const kv_t* __restrict__ pool, const int (&blk)[CH],
                                          int base, int lo, int end, int rg, int li, long long block_stride,
                                          long long k_off, long long v_off,
                                          uint4 (&kr)[CH][VPL], uint4 (&vr)[CH][VPL]) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int pos = base + c * RPW + rg;
        const long long row = (long long)blk[c] * block_stride + (pos % BLOCK_SIZE) * D;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int vi = j * LPR + li;
            if (pos < end && pos >= lo && vi < NV) {
                kr[c][j] = ld_stream(pool + row + k_off + vi * E);
                vr[c][j] = ld_stream(pool + row + v_off + vi * E);
            } else {
                kr[c][j] = uint4{0u, 0u, 0u, 0u};
                vr[c][j] = uint4{0u, 0u, 0u, 0u};
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS) paged_decode(
    const kv_t* __restrict__ q,             // [num_items, num_q_heads, HEAD_DIM]
    const kv_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ item_seq,       // [num_items]
    const int* __restrict__ item_len,       // [num_items]
    kv_t* __restrict__ out,                 // [num_items, num_q_heads, HEAD_DIM] (parts == 0)
    float* __restrict__ part_o,             // [num_items, num_q_heads, num_splits, HEAD_DIM]
    float* __restrict__ part_lse,           // [num_items, num_q_heads, num_splits]
    int layer, int num_layers, int num_kv_heads, int group, int max_blocks,
    int num_splits, const int* __restrict__ item_start, int parts, int window, float softcap,
    float scale_log2)
{
    pdl_launch_dependents();  // a programmatic merge launch may start now: it waits for the partials itself
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = lane / LPR, li = lane % LPR;
    const int nsub = group / GS;
    int bx = blockIdx.x;
    const int sub = bx % nsub; bx /= nsub;
    const int h = bx % num_kv_heads;
    const int item = bx / num_kv_heads;
    const int split = blockIdx.y;
    const int num_q_heads = num_kv_heads * group;
    const int head0 = h * group + sub * GS;

    const int len = item_len[item];
    int lo = window > 0 ? max(0, len - window) : 0;  // the first position seen
    if (item_start != nullptr) lo = max(lo, item_start[item]);  // after its shared prefix (cascade)
    const int from = lo & ~15;
    int chunk = (len - from + num_splits - 1) / num_splits;
    chunk = (chunk + 15) & ~15;
    const int start = from + split * chunk;
    const int end = min(len, start + chunk);

    // q for this lane's dims, pre-scaled into the log2 domain.
    float qr[GS][VPL][E];
#pragma unroll
    for (int g = 0; g < GS; ++g) {
        const kv_t* qp = q + ((long long)item * num_q_heads + head0 + g) * D;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int vi = j * LPR + li;
            if (vi < NV) {
                vec_to_float(ld_vec(qp + vi * E), qr[g][j]);
#pragma unroll
                for (int e = 0; e < E; ++e) qr[g][j][e] *= scale_log2;
            } else {
#pragma unroll
                for (int e = 0; e < E; ++e) qr[g][j][e] = 0.f;
            }
        }
    }

    float m[GS], l[GS], acc[GS][VPL][E];
#pragma unroll
    for (int g = 0; g < GS; ++g) {
        m[g] = NEG_INF; l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < VPL; ++j)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[g][j][e] = 0.f;
    }

    const int* table = block_tables + (long long)item_seq[item] * max_blocks;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * D;
    const long long k_off = ((long long)layer * 2 * num_kv_heads + h) * BLOCK_SIZE * D;
    const long long v_off = k_off + (long long)num_kv_heads * BLOCK_SIZE * D;
    constexpr int STEP = NWARPS * ROWS_PER_ITER;

    // Software pipeline: the K/V rows of the next iteration and the block ids of
    // the one after are in flight while this iteration computes.
    int blk[CH];
    uint4 kc[CH][VPL], vc[CH][VPL], kn[CH][VPL], vn[CH][VPL];
    int base = start + warp * ROWS_PER_ITER;
    lookup_blocks(table, base, lo, end, rg, blk);
    load_rows(pool, blk, base, lo, end, rg, li, block_stride, k_off, v_off, kc, vc);
    lookup_blocks(table, base + STEP, lo, end, rg, blk);

    for (; base < end; base += STEP) {
        load_rows(pool, blk, base + STEP, lo, end, rg, li, block_stride, k_off, v_off, kn, vn);
        lookup_blocks(table, base + 2 * STEP, lo, end, rg, blk);
        bool valid[CH];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int pos = base + c * RPW + rg;
            valid[c] = pos < end && pos >= lo;
        }
        // Scores: partial dot products, then a butterfly over the LPR lanes of a row.
        float s[CH][GS];
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
            for (int g = 0; g < GS; ++g) s[c][g] = 0.f;
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                float kf[E];
                vec_to_float(kc[c][j], kf);
#pragma unroll
                for (int g = 0; g < GS; ++g)
#pragma unroll
                    for (int e = 0; e < E; ++e) s[c][g] = fmaf(qr[g][j][e], kf[e], s[c][g]);
            }
        }
#pragma unroll
        for (int off = 1; off < LPR; off <<= 1)
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int g = 0; g < GS; ++g) s[c][g] += __shfl_xor_sync(0xffffffffu, s[c][g], off);
        if (softcap > 0.f) {
            const float inv = 1.f / softcap;
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int g = 0; g < GS; ++g) s[c][g] = softcap * tanhf(s[c][g] * inv);
        }

        // Online softmax over the CH rows of this lane group, then P.V.
        float vf[CH][VPL][E];
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int j = 0; j < VPL; ++j) vec_to_float(vc[c][j], vf[c][j]);
#pragma unroll
        for (int g = 0; g < GS; ++g) {
            float mx = NEG_INF;
#pragma unroll
            for (int c = 0; c < CH; ++c) if (valid[c]) mx = fmaxf(mx, s[c][g]);
            // Lazy rescaling: the reference max moves only when a score exceeds it
            // by more than 2^8, so most iterations skip the correction of acc.
            if (mx > m[g] + 8.f) {
                const float corr = exp2f(m[g] - mx);
                m[g] = mx;
                l[g] *= corr;
#pragma unroll
                for (int j = 0; j < VPL; ++j)
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[g][j][e] *= corr;
            }
            if (m[g] == NEG_INF) continue;  // no valid row yet for this lane group
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const float p = valid[c] ? exp2f(s[c][g] - m[g]) : 0.f;
                l[g] += p;
#pragma unroll
                for (int j = 0; j < VPL; ++j)
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[g][j][e] = fmaf(p, vf[c][j][e], acc[g][j][e]);
            }
        }
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int j = 0; j < VPL; ++j) { kc[c][j] = kn[c][j]; vc[c][j] = vn[c][j]; }
    }

    // Merge the row groups of the warp (lanes with the same li hold the same dims).
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GS; ++g) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], off);
            const float mn = fmaxf(m[g], mo);
            const float a = mn == NEG_INF ? 0.f : exp2f(m[g] - mn);
            const float b = mn == NEG_INF ? 0.f : exp2f(mo - mn);
            m[g] = mn;
            l[g] = l[g] * a + lo * b;
#pragma unroll
            for (int j = 0; j < VPL; ++j)
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const float ao = __shfl_xor_sync(0xffffffffu, acc[g][j][e], off);
                    acc[g][j][e] = acc[g][j][e] * a + ao * b;
                }
        }
    }

    // Merge the warps through shared memory.
    __shared__ float sm_m[NWARPS][GS], sm_l[NWARPS][GS];
    __shared__ float sm_acc[NWARPS][GS][D];
    if (rg == 0) {
#pragma unroll
        for (int g = 0; g < GS; ++g) {
            if (li == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                const int vi = j * LPR + li;
                if (vi < NV) {
#pragma unroll
                    for (int e = 0; e < E; ++e) sm_acc[warp][g][vi * E + e] = acc[g][j][e];
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GS * D; idx += NTHREADS) {
        const int g = idx / D, d = idx % D;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float lsum = 0.f, o = 0.f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const float a = exp2f(sm_m[w][g] - mx);
                lsum += sm_l[w][g] * a;
                o += sm_acc[w][g][d] * a;
            }
        }
        const long long row = (long long)item * num_q_heads + head0 + g;
        if (parts == 0) {
            out[row * D + d] = from_float(lsum > 0.f ? o / lsum : 0.f);
        } else {
            part_o[(row * parts + split) * D + d] = lsum > 0.f ? o / lsum : 0.f;
            if (d == 0) part_lse[row * parts + split] = lsum > 0.f ? mx + __log2f(lsum) : NEG_INF;
            // the shared-prefix slots start empty: cascade_prefix (launched next) fills its members'
            if (d == 0 && split == 0)
                for (int s = num_splits; s < parts; ++s) part_lse[row * parts + s] = NEG_INF;
        }
    }
}
