// merge_splits.cu: the log-sum-exp merge of partial attention states, after
// a split-K or cascade decode (paged_decode_tc.cu, paged_decode.cu,
// cascade_prefix.cu write the partials; this writes the output).
//
// out[row] = sum_s w_s * part_o[row, s] with w_s proportional to
// 2^part_lse[row, s] (log-sum-exp merge; num_splits <= 1024: every partial
// slot of a row, splits first, then the cascade's). Out in the pool's compute
// dtype (KV_DTYPE; the loader builds it per dtype and head dim only).
// level_mask (a decode cascade; else null: every slot counts): slot s >=
// own_parts belongs to level (s - own_parts) / chunks and counts only where
// bit level of level_mask[row / num_q_heads] is set (the row's item is a
// member of a segment of that level): the decode kernel never marks the
// others, so the two may run at the same time.
// sinks (optional, float32 [num_q_heads], natural-log units of the scaled scores;
// null: none): an attention sink per query head (GPT-OSS's ``sinks``): a logit that
// joins every row's softmax denominator and adds no value, so the output is
// sum_s w_s part_o[s] / (sum_s w_s + e^sink). Row r's head is r % num_q_heads.
// merge_splits: grid x = row (item * num_q_heads + head); 256 threads: the
// weights are computed in parallel, then each thread sums float4 columns of
// its share of the splits (MERGE_THREADS / (HEAD_DIM / 4) split lanes; the
// first PF slots of each loaded at the start, beside the weights' loads) and
// the lanes are added up through shared memory. For rows of many slots (a
// long context split many ways).
// merge_splits_warp: a warp per row (8 rows a CTA), each lane HEAD_DIM / 32
// columns over every slot in turn: for many rows of few slots (a decode
// cascade's own and shared parts, a few splits), where a CTA a row would
// launch 8x as many CTAs for a few hundred bytes each. Same weights, same
// result up to the order of the float32 sums.
#include "kvpager_common.cuh"

#if KV_FP8
#error "merge_splits.cu reads float32 partials and writes the compute dtype: build it without KV_FP8"
#endif

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

#define MERGE_THREADS 256
constexpr float LOG2E_F = 1.4426950408889634f;  // a sink's natural-log units to the partials' log2 units
constexpr int D = HEAD_DIM;
constexpr int MV = D / 4;                  // float4 columns per row
constexpr int MSL = MERGE_THREADS / MV;    // split lanes
constexpr int PF = 16;                     // slots a split lane loads at the start

__device__ __forceinline__ float block_reduce(float x, bool is_max, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, off);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    x = red[0];
#pragma unroll
    for (int w = 1; w < MERGE_THREADS / 32; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
    __syncthreads();  // red is reused by the next call
    return x;
}

// Slots of zero weight (empty: log2-sum-exp -inf) are not read.
extern "C" __global__ void __launch_bounds__(MERGE_THREADS) merge_splits(
    const float* __restrict__ part_o,    // [num_rows, num_splits, HEAD_DIM]
    const float* __restrict__ part_lse,  // [num_rows, num_splits]
    kv_t* __restrict__ out,              // [num_rows, HEAD_DIM]
    int num_splits,
    const int* __restrict__ level_mask,  // [num_rows / num_q_heads] or null
    int own_parts, int chunks, int num_q_heads,
    const float* __restrict__ sinks)         // [num_q_heads] or null
{
    pdl_wait();  // launched programmatically: the partials are complete past this point
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const float* lse = part_lse + row * num_splits;
    const int levels = level_mask ? level_mask[row / num_q_heads] : -1;
    // This thread's first PF slots' columns, loaded before the weights are known (their loads
    // and the weights' run at once; a row of many slots then costs one round of loads).
    const int v = tid % MV, sl = tid / MV;
    const float4* po = reinterpret_cast<const float4*>(part_o + row * num_splits * D) + v;
    float4 pre[PF];
#pragma unroll
    for (int i = 0; i < PF; ++i) {
        const int s = sl + i * MSL;
        pre[i] = sl < MSL && s < num_splits ? po[(long long)s * MV] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __shared__ float w[1024];
    __shared__ float red[MERGE_THREADS / 32];
    __shared__ float4 lanes[MSL][MV];
    float mx = NEG_INF;
    for (int s = tid; s < num_splits; s += MERGE_THREADS) {
        w[s] = s < own_parts || (levels >> ((s - own_parts) / chunks)) & 1 ? lse[s] : NEG_INF;
        mx = fmaxf(mx, w[s]);
    }
    mx = block_reduce(mx, true, red);
    const float sink = sinks ? sinks[row % num_q_heads] * LOG2E_F : NEG_INF;
    mx = fmaxf(mx, sink);
    float t = 0.f;
    for (int s = tid; s < num_splits; s += MERGE_THREADS) {
        const float x = w[s] == NEG_INF ? 0.f : exp2f(w[s] - mx);
        w[s] = x;
        t += x;
    }
    t = block_reduce(t, false, red);  // its barriers also publish w
    if (sinks) t += exp2f(sink - mx);
    const float inv_total = t > 0.f ? 1.f / t : 0.f;
    if (sl < MSL) {
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int i = 0; i < PF; ++i) {
            const int s = sl + i * MSL;
            const float ws = s < num_splits ? w[s] : 0.f;
            if (ws != 0.f) {  // a select: an empty slot's columns may hold anything
                a.x += ws * pre[i].x; a.y += ws * pre[i].y; a.z += ws * pre[i].z; a.w += ws * pre[i].w;
            }
        }
#pragma unroll 4
        for (int s = sl + PF * MSL; s < num_splits; s += MSL) {
            const float ws = w[s];
            if (ws == 0.f) continue;
            const float4 p = po[(long long)s * MV];
            a.x += ws * p.x; a.y += ws * p.y; a.z += ws * p.z; a.w += ws * p.w;
        }
        lanes[sl][v] = a;
    }
    __syncthreads();
    for (int d = tid; d < D; d += MERGE_THREADS) {
        float o = 0.f;
#pragma unroll
        for (int l = 0; l < MSL; ++l) o += reinterpret_cast<const float*>(&lanes[l][0])[d];
        out[row * D + d] = from_float(o * inv_total);
    }
}

#if HEAD_DIM % 32 == 0
constexpr int WC = D / 32;  // columns per lane

// One warp per row; rows past num_rows (the last CTA's) do nothing.
extern "C" __global__ void __launch_bounds__(256) merge_splits_warp(
    const float* __restrict__ part_o,    // [num_rows, num_splits, HEAD_DIM]
    const float* __restrict__ part_lse,  // [num_rows, num_splits]
    kv_t* __restrict__ out,              // [num_rows, HEAD_DIM]
    int num_splits,
    const int* __restrict__ level_mask,  // [num_rows / num_q_heads] or null
    int own_parts, int chunks, int num_q_heads, int num_rows,
    const float* __restrict__ sinks)         // [num_q_heads] or null
{
    pdl_wait();  // launched programmatically: the partials are complete past this point
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= num_rows) return;
    const int lane = threadIdx.x & 31;
    const float* lse = part_lse + row * num_splits;
    const int levels = level_mask ? level_mask[row / num_q_heads] : -1;
    float mx = NEG_INF;
    for (int s = lane; s < num_splits; s += 32)
        if (s < own_parts || (levels >> ((s - own_parts) / chunks)) & 1) mx = fmaxf(mx, lse[s]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float sink = sinks ? sinks[row % num_q_heads] * LOG2E_F : NEG_INF;
    mx = fmaxf(mx, sink);
    float acc[WC];
#pragma unroll
    for (int c = 0; c < WC; ++c) acc[c] = 0.f;
    float t = sinks ? exp2f(sink - mx) : 0.f;
    const float* po = part_o + row * num_splits * D + lane * WC;
#pragma unroll 4
    for (int s = 0; s < num_splits; ++s) {
        if (!(s < own_parts || (levels >> ((s - own_parts) / chunks)) & 1)) continue;
        const float l = lse[s];
        if (l == NEG_INF) continue;  // an empty slot: not read
        const float w = exp2f(l - mx);
        t += w;
        const float* p = po + (long long)s * D;
        if constexpr (WC % 4 == 0) {
#pragma unroll
            for (int c = 0; c < WC; c += 4) {
                const float4 v = *reinterpret_cast<const float4*>(p + c);
                acc[c] += w * v.x; acc[c + 1] += w * v.y; acc[c + 2] += w * v.z; acc[c + 3] += w * v.w;
            }
        } else if constexpr (WC % 2 == 0) {
#pragma unroll
            for (int c = 0; c < WC; c += 2) {
                const float2 v = *reinterpret_cast<const float2*>(p + c);
                acc[c] += w * v.x; acc[c + 1] += w * v.y;
            }
        } else {
#pragma unroll
            for (int c = 0; c < WC; ++c) acc[c] += w * p[c];
        }
    }
    const float inv_total = t > 0.f ? 1.f / t : 0.f;
    kv_t* o = out + row * D + lane * WC;
#pragma unroll
    for (int c = 0; c < WC; ++c) o[c] = from_float(acc[c] * inv_total);
}
#endif
