// token_logprobs.cu: each row's token log-probability and the K most likely
// tokens' (kvpager/hf/logprobs.py; its torch path is the reference), one CTA a
// row, one read of the row.
//
// A thread walks the tokens i = tid, tid + THREADS, ... keeping an online
// log-sum-exp (its max m and sum s of exp(x - m)) and its own TOP best
// (logit, id) pairs, sorted, better = larger logit, then lower id (a strict
// order: ties by lowest id). The CTA then merges the sums (a warp's by
// shuffles, the warps' through shared memory) and the lists: `k` rounds, each
// taking the best head of all threads' lists, the owner popping it.
//
// out[row] (float64, 1 + 2k): x[token] - lse, then the k best logits - lse,
// then their ids: the layout of kvpager/hf/logprobs.py's `TokenLogprobs.of`.
// A NaN logit makes the row's log-sum-exp NaN (it never enters the top; a
// top slot no token filled, possible only where NaNs leave fewer than k
// tokens, has id -1); a row whose logits are all -inf gives NaN
// log-probabilities. Every other token, -inf included, can enter the top, so
// k <= vocab fills it.
// No CUDA headers (as kvpager_common.cuh): 16-bit logits are read as raw bits.

#ifndef LOGIT_DTYPE
#define LOGIT_DTYPE 1  // 0 float16, 1 bfloat16, 2 float32
#endif
#ifndef TOP
#define TOP 8  // the most top tokens a launch may ask for (its k <= TOP)
#endif
#ifndef THREADS
#define THREADS 512
#endif
#define WARPS (THREADS / 32)
#define FULL 0xffffffffu
#define POS_INF __int_as_float(0x7f800000)
#define NEG_INF (-POS_INF)
#define NO_ID 0x7fffffff

__device__ __forceinline__ float logit_at(const void* row, long long i) {
#if LOGIT_DTYPE == 0
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<const unsigned short*>(row)[i]));
    return f;
#elif LOGIT_DTYPE == 1
    return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(row)[i]) << 16);
#else
    return static_cast<const float*>(row)[i];
#endif
}

// (a, i) before (b, j): a larger logit, or the same logit and a lower id
__device__ __forceinline__ bool better(float a, int i, float b, int j) {
    return a > b || (a == b && i < j);
}

// two (max, sum of exp(x - max)) into one; an empty side has max -inf and sum 0
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
    float hi = fmaxf(m, m2);
    if (hi == NEG_INF) return;  // both empty
    s = (m == NEG_INF ? 0.0f : s * __expf(m - hi)) + (m2 == NEG_INF ? 0.0f : s2 * __expf(m2 - hi));
    m = hi;
}

extern "C" __global__ void __launch_bounds__(THREADS) token_logprobs(
    const void* __restrict__ logits, long long row_stride, int vocab, const long long* __restrict__ tokens,
    int k, double* __restrict__ out) {
    __shared__ float red_m[WARPS], red_s[WARPS], top_v[WARPS];
    __shared__ int top_i[WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long r = blockIdx.x;
#if LOGIT_DTYPE == 2
    const char* row = static_cast<const char*>(logits) + r * row_stride * 4;
#else
    const char* row = static_cast<const char*>(logits) + r * row_stride * 2;
#endif

    float m = NEG_INF, s = 0.0f;
    bool nan = false;
    float tv[TOP > 0 ? TOP : 1];
    int ti[TOP > 0 ? TOP : 1];
#pragma unroll
    for (int j = 0; j < TOP; ++j) { tv[j] = NEG_INF; ti[j] = NO_ID; }

#pragma unroll 2
    for (int i = tid; i < vocab; i += THREADS) {
        float x = logit_at(row, i);
        if (x > m) {
            s = (m == NEG_INF ? 0.0f : s * __expf(m - x)) + 1.0f;
            m = x;
        } else if (x > NEG_INF) {
            s += __expf(x - m);
        } else {
            nan |= x != x;
        }
        if (TOP > 0 && better(x, i, tv[TOP > 0 ? TOP - 1 : 0], ti[TOP > 0 ? TOP - 1 : 0])) {
            tv[TOP - 1] = x;
            ti[TOP - 1] = i;
#pragma unroll
            for (int j = TOP - 1; j > 0; --j) {
                if (better(tv[j], ti[j], tv[j - 1], ti[j - 1])) {
                    float fv = tv[j]; tv[j] = tv[j - 1]; tv[j - 1] = fv;
                    int fi = ti[j]; ti[j] = ti[j - 1]; ti[j - 1] = fi;
                }
            }
        }
    }

    // the row's log-sum-exp
#pragma unroll
    for (int o = 16; o; o >>= 1) merge_lse(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
    const int nan_seen = __syncthreads_or(nan);
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < WARPS ? red_m[lane] : NEG_INF;
        s = lane < WARPS ? red_s[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o; o >>= 1) merge_lse(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
        if (lane == 0) { red_m[0] = m; red_s[0] = s; }
    }
    __syncthreads();
    const float lse = nan_seen ? __int_as_float(0x7fffffff) : red_m[0] + __logf(red_s[0]);
    double* o = out + r * (1 + 2LL * k);
    if (tid == 0) o[0] = static_cast<double>(logit_at(row, tokens[r]) - lse);

    // the k best of all threads' lists: a round each, the best head taken and popped by its owner
    for (int round = 0; round < k; ++round) {
        float v = TOP > 0 ? tv[0] : NEG_INF;
        int id = TOP > 0 ? ti[0] : NO_ID;
#pragma unroll
        for (int d = 16; d; d >>= 1) {
            float v2 = __shfl_xor_sync(FULL, v, d);
            int id2 = __shfl_xor_sync(FULL, id, d);
            if (better(v2, id2, v, id)) { v = v2; id = id2; }
        }
        if (lane == 0) { top_v[warp] = v; top_i[warp] = id; }
        __syncthreads();
        if (warp == 0) {
            v = lane < WARPS ? top_v[lane] : NEG_INF;
            id = lane < WARPS ? top_i[lane] : NO_ID;
#pragma unroll
            for (int d = 16; d; d >>= 1) {
                float v2 = __shfl_xor_sync(FULL, v, d);
                int id2 = __shfl_xor_sync(FULL, id, d);
                if (better(v2, id2, v, id)) { v = v2; id = id2; }
            }
            if (lane == 0) {
                o[1 + round] = static_cast<double>(v - lse);
                o[1 + k + round] = id == NO_ID ? -1.0 : static_cast<double>(id);
                top_i[0] = id;
            }
        }
        __syncthreads();
        const int won = top_i[0];
        __syncthreads();  // (read before the next round's writes)
        if (TOP > 0 && ti[0] == won && won != NO_ID) {
#pragma unroll
            for (int j = 0; j + 1 < (TOP > 0 ? TOP : 1); ++j) { tv[j] = tv[j + 1]; ti[j] = ti[j + 1]; }
            if (TOP > 0) { tv[TOP - 1] = NEG_INF; ti[TOP - 1] = NO_ID; }
        }
    }
}
