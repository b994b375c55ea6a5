// token_logprobs.cu: each row's token log-probability and the K most likely
// tokens' (kvpager/hf/logprobs.py; its torch path is the reference), one CTA a
// row, one read of the row.
//
// A thread walks the tokens U at a time, i = tid + j * THREADS within each
// stride of U * THREADS (U independent loads in flight), keeping an online
// log-sum-exp (its max m and sum s of exp(x - m), rescaled once per U tokens)
// and its own TOP best (logit, id) pairs, sorted, better = larger logit, then
// lower id (a strict order: ties by lowest id). The CTA then merges the sums
// (a warp's by shuffles, the warps' through shared memory) and the lists:
// each warp its lanes' (k rounds of a shuffle argmax of the lanes' heads, the
// owner popping it) into shared memory, then warp 0 the warps' (k rounds over
// the lists' heads), with no barrier inside the rounds.
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
#define U 8
#define TOPS (TOP > 0 ? TOP : 1)
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

// the better of (v, id) and the other lanes' across the warp, in every lane
__device__ __forceinline__ void warp_best(float& v, int& id) {
#pragma unroll
    for (int d = 16; d; d >>= 1) {
        float v2 = __shfl_xor_sync(FULL, v, d);
        int id2 = __shfl_xor_sync(FULL, id, d);
        if (better(v2, id2, v, id)) { v = v2; id = id2; }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) token_logprobs(
    const void* __restrict__ logits, long long row_stride, int vocab, const long long* __restrict__ tokens,
    int k, double* __restrict__ out) {
    __shared__ float red_m[WARPS], red_s[WARPS];
    __shared__ float list_v[WARPS][TOPS];
    __shared__ int list_i[WARPS][TOPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long r = blockIdx.x;
#if LOGIT_DTYPE == 2
    const char* row = static_cast<const char*>(logits) + r * row_stride * 4;
#else
    const char* row = static_cast<const char*>(logits) + r * row_stride * 2;
#endif

    float m = NEG_INF, s = 0.0f;
    bool nan = false;
    float tv[TOPS];
    int ti[TOPS];
#pragma unroll
    for (int j = 0; j < TOPS; ++j) { tv[j] = NEG_INF; ti[j] = NO_ID; }

    for (int base = tid; base < vocab; base += U * THREADS) {
        float x[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int i = base + j * THREADS;
            x[j] = i < vocab ? logit_at(row, i) : NEG_INF;
        }
        float hi = x[0];
#pragma unroll
        for (int j = 1; j < U; ++j) hi = fmaxf(hi, x[j]);  // (NaN ignored: counted below)
        if (hi > m) {
            s = m == NEG_INF ? 0.0f : s * __expf(m - hi);
            m = hi;
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            nan |= x[j] != x[j];
            if (x[j] > NEG_INF) s += __expf(x[j] - m);
            const int i = base + j * THREADS;
            if (TOP > 0 && i < vocab && better(x[j], i, tv[TOPS - 1], ti[TOPS - 1])) {
                tv[TOPS - 1] = x[j];
                ti[TOPS - 1] = i;
#pragma unroll
                for (int t = TOPS - 1; t > 0; --t) {
                    if (better(tv[t], ti[t], tv[t - 1], ti[t - 1])) {
                        float fv = tv[t]; tv[t] = tv[t - 1]; tv[t - 1] = fv;
                        int fi = ti[t]; ti[t] = ti[t - 1]; ti[t - 1] = fi;
                    }
                }
            }
        }
    }

    // the row's log-sum-exp
#pragma unroll
    for (int o = 16; o; o >>= 1) merge_lse(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; }
    // each warp's k best, into shared memory (no barrier: the warp's own rounds)
    for (int round = 0; round < k; ++round) {
        float v = tv[0];
        int id = ti[0];
        warp_best(v, id);
        if (lane == 0) { list_v[warp][round] = v; list_i[warp][round] = id; }
        if (ti[0] == id && id != NO_ID) {
#pragma unroll
            for (int j = 0; j + 1 < TOPS; ++j) { tv[j] = tv[j + 1]; ti[j] = ti[j + 1]; }
            tv[TOPS - 1] = NEG_INF;
            ti[TOPS - 1] = NO_ID;
        }
    }
    const int nan_seen = __syncthreads_or(nan);  // (also the barrier before reading red_* and list_*)
    if (warp != 0) return;
    m = lane < WARPS ? red_m[lane] : NEG_INF;
    s = lane < WARPS ? red_s[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o; o >>= 1) merge_lse(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
    const float lse = nan_seen ? __int_as_float(0x7fffffff) : m + __logf(s);
    double* o = out + r * (1 + 2LL * k);
    if (lane == 0) o[0] = static_cast<double>(logit_at(row, tokens[r]) - lse);
    // the k best of the warps' lists: lane w walks warp w's
    int at = 0;
    for (int round = 0; round < k; ++round) {
        float v = lane < WARPS && at < k ? list_v[lane][at] : NEG_INF;
        int id = lane < WARPS && at < k ? list_i[lane][at] : NO_ID;
        const int mine = id;
        warp_best(v, id);
        if (mine == id && id != NO_ID) ++at;
        if (lane == 0) {
            o[1 + round] = static_cast<double>(v - lse);
            o[1 + k + round] = id == NO_ID ? -1.0 : static_cast<double>(id);
        }
    }
}
