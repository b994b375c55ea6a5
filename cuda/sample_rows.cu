// sample_rows.cu: a decode pass's sampled tokens, one CTA a row, no sort.
//
// The twin is kvpager/hf/draws.py, whose docstring defines a row's token
// exactly; this kernel gives the same token bit for bit: every float step is
// an explicitly rounded IEEE operation (__fmul_rn, __fdiv_rn, ...: the module
// is built with --use_fast_math, which would otherwise contract or
// approximate them), every sum an integer.
//
// A row's passes over its vocabulary (V tokens; 512 threads):
//   A. penalized logits, scores s = y / t into `scratch` (float32 [n, V]), the
//      best score M and the first most likely token (a greedy row stops here).
//   top-k (0 < k < V): `select` finds the k-th largest score by count.
//   top-p (p < 1): `select` finds the boundary score by integer weight W among
//      the tokens top-k kept: the first, in order of score, whose running sum
//      of W reaches ceil(p * Z); of the tokens tied at that score, those of the
//      lowest ids are kept (the twin's order), found by one more pass where
//      not all of them are.
//   masses: each tile's (TILE tokens) kept W; the draw T = floor(u * Z') lands
//      in one tile, which is then scanned in vocabulary order.
// `select` takes a first histogram over bins of M - s (BINS of them, linear
// up to SPAN, the rest in the last: a row's scores spread over them, so the
// shared-memory atomics rarely collide), then the key range of the chosen
// bin (keys: the scores' order-preserving uint32), then 8-bit digits of the
// keys within it until one key is left.
// No CUDA headers (as kvpager_common.cuh): 16-bit logits are read as raw bits.

#ifndef LOGIT_DTYPE
#define LOGIT_DTYPE 1  // 0 float16, 1 bfloat16, 2 float32
#endif

#ifndef THREADS
#define THREADS 512
#endif
#define WARPS (THREADS / 32)
#define PER 8
#define TILE (THREADS * PER)
#define MAX_TILES 256  // vocabularies up to 1,048,576 tokens
#define BINS 1024
#if BINS % THREADS != 0 || THREADS < 256
#error "THREADS must divide BINS and be at least 256 (a digit a thread)"
#endif
#define SPAN 40.0f
#define FULL 0xffffffffu

typedef unsigned long long u64;

// kvpager/hf/draws.py's constants, as float32 bits
#define LOG2E 0x1.715476p+0f
#define LN2_HI 0x1.62e4p-1f
#define LN2_LO 0x1.7f7d1cp-20f
#define CUT (-40.0f)

#define POS_INF __int_as_float(0x7f800000)
#define NEG_INF (-POS_INF)

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

// draws.exp_weights: w ~ exp(x) by fixed float32 steps, 0 below CUT (and for NaN)
__device__ __forceinline__ float exp_weight(float x) {
    if (!(x >= CUT)) return 0.0f;
    float n = rintf(__fmul_rn(x, LOG2E));
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 0x1.a01a02p-13f;
    p = __fadd_rn(__fmul_rn(p, r), 0x1.6c16c2p-10f);
    p = __fadd_rn(__fmul_rn(p, r), 0x1.111112p-7f);
    p = __fadd_rn(__fmul_rn(p, r), 0x1.555556p-5f);
    p = __fadd_rn(__fmul_rn(p, r), 0x1.555556p-3f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    return __fmul_rn(p, __uint_as_float(static_cast<unsigned>(static_cast<int>(n) + 127) << 23));
}

// the scores' order as unsigned ints (-0 as +0; NaN never reaches here)
__device__ __forceinline__ unsigned key_of(float s) {
    unsigned b = __float_as_uint(s);
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float score_of(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

struct Shared {
    u64 mass[BINS];
    unsigned count[BINS];
    u64 tile_mass[MAX_TILES];
    unsigned tile_ties[MAX_TILES];
    u64 red[WARPS + 1];
    float fval[WARPS];
    int fidx[WARPS];
    u64 picked[4];
    unsigned bounds[2];
};

__device__ __forceinline__ u64 warp_sum(u64 v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// every thread's v summed (all threads call it)
__device__ u64 block_sum(u64 v, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh.red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_sum(lane < WARPS ? sh.red[lane] : 0);
        if (lane == 0) sh.red[WARPS] = v;
    }
    __syncthreads();
    v = sh.red[WARPS];
    __syncthreads();
    return v;
}

// the sum of v over the threads before this one, and the whole sum in *total
__device__ u64 block_exclusive(u64 v, Shared& sh, u64* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        u64 n = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == 31) sh.red[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 w = lane < WARPS ? sh.red[lane] : 0, wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            u64 n = __shfl_up_sync(FULL, wi, o);
            if (lane >= o) wi += n;
        }
        if (lane < WARPS) sh.red[lane] = wi - w;
        if (lane == 31) sh.red[WARPS] = wi;
    }
    __syncthreads();
    u64 out = sh.red[warp] + inc - v;
    *total = sh.red[WARPS];
    __syncthreads();
    return out;
}

// the best (value, index): larger value, then smaller index
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

__device__ void block_best(float& v, int& i, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o; o >>= 1) better(v, i, __shfl_xor_sync(FULL, v, o), __shfl_xor_sync(FULL, i, o));
    if (lane == 0) {
        sh.fval[warp] = v;
        sh.fidx[warp] = i;
    }
    __syncthreads();
    v = sh.fval[0];
    i = sh.fidx[0];
    for (int w = 1; w < WARPS; ++w) better(v, i, sh.fval[w], sh.fidx[w]);
    __syncthreads();
}

__device__ void block_min_max(unsigned& lo, unsigned& hi, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(FULL, lo, o));
        hi = max(hi, __shfl_xor_sync(FULL, hi, o));
    }
    if (lane == 0) {
        sh.fidx[warp] = static_cast<int>(lo);
        sh.fval[warp] = __uint_as_float(hi);
    }
    __syncthreads();
    for (int w = 0; w < WARPS; ++w) {
        lo = min(lo, static_cast<unsigned>(sh.fidx[w]));
        hi = max(hi, __float_as_uint(sh.fval[w]));
    }
    __syncthreads();
}

struct Row {
    const float* s;  // the row's scores (scratch)
    int vocab;
    float best;      // M
    float scale;     // 2**S
};

__device__ __forceinline__ u64 big_weight(float s, const Row& row) {
    return static_cast<u64>(floorf(__fmul_rn(exp_weight(__fsub_rn(s, row.best)), row.scale)));
}

// The boundary among the candidates (keys >= floor_key) in descending key order:
// the key K where the weight of candidates above K is below `need` and with K's
// tokens reaches it; weight = W (by_mass) or 1. fraction >= 0: need =
// ceil(fraction * total weight), found after the first pass. Returns K; the
// weight above it and the count at it in picked[1], picked[2], need in picked[3].
__device__ unsigned select(const Row& row, Shared& sh, unsigned floor_key, bool by_mass, u64 need,
                           float fraction) {
    const int t = threadIdx.x, lane = t & 31;
    for (int b = t; b < BINS; b += THREADS) {
        sh.mass[b] = 0;
        sh.count[b] = 0;
    }
    __syncthreads();
    const float per_bin = BINS / SPAN;
    for (int base = 0; base < row.vocab; base += THREADS) {
        const int i = base + t;
        int bin = -1;
        u64 w = 0;
        if (i < row.vocab) {
            const float s = row.s[i];
            if (key_of(s) >= floor_key) {
                const float x = __fsub_rn(row.best, s) * per_bin;
                bin = x < static_cast<float>(BINS - 1) ? static_cast<int>(x) : BINS - 1;
                if (by_mass) w = big_weight(s, row);
            }
        }
        const unsigned peers = __match_any_sync(FULL, bin);
        if (bin >= 0) {
            if (lane == __ffs(peers) - 1) atomicAdd(&sh.count[bin], __popc(peers));
            if (w) atomicAdd(&sh.mass[bin], w);
        }
    }
    __syncthreads();
    // bins in order (descending score), BINS / THREADS consecutive ones a thread
    constexpr int per_thread = BINS / THREADS;
    u64 own = 0;
    for (int k = 0; k < per_thread; ++k) own += by_mass ? sh.mass[per_thread * t + k] : sh.count[per_thread * t + k];
    u64 total;
    u64 before = block_exclusive(own, sh, &total);
    if (fraction >= 0.0f) need = static_cast<u64>(ceil(__dmul_rn(static_cast<double>(fraction),
                                                                 static_cast<double>(total))));
    if (need > total) need = total;  // (never: need <= total by construction)
    if (need == 0) need = 1;
    for (int k = 0; k < per_thread; ++k) {
        const int b = per_thread * t + k;
        const u64 w = by_mass ? sh.mass[b] : sh.count[b];
        if (before < need && before + w >= need) {
            sh.picked[0] = b;
            sh.picked[1] = before;
        }
        before += w;
    }
    __syncthreads();
    const int bin = static_cast<int>(sh.picked[0]);
    u64 above = sh.picked[1];
    u64 ties = sh.count[bin];
    // the key range of the chosen bin
    unsigned lo = 0xffffffffu, hi = 0u;
    for (int i = t; i < row.vocab; i += THREADS) {
        const float s = row.s[i];
        const unsigned key = key_of(s);
        if (key < floor_key) continue;
        const float x = __fsub_rn(row.best, s) * per_bin;
        const int b = x < static_cast<float>(BINS - 1) ? static_cast<int>(x) : BINS - 1;
        if (b == bin) {
            lo = min(lo, key);
            hi = max(hi, key);
        }
    }
    block_min_max(lo, hi, sh);
    // digits of the keys in [lo, hi], highest first, until one key is left
    while (lo != hi) {
        const int common = __clz(lo ^ hi);
        const int shift = max(0, 32 - common - 8);
        for (int d = t; d < 256; d += THREADS) {
            sh.mass[d] = 0;
            sh.count[d] = 0;
        }
        __syncthreads();
        for (int base = 0; base < row.vocab; base += THREADS) {
            const int i = base + t;
            int digit = -1;
            u64 w = 0;
            if (i < row.vocab) {
                const float s = row.s[i];
                const unsigned key = key_of(s);
                if (key >= floor_key && key >= lo && key <= hi) {
                    digit = static_cast<int>((key >> shift) & 255u);
                    if (by_mass) w = big_weight(s, row);
                }
            }
            const unsigned peers = __match_any_sync(FULL, digit);
            if (digit >= 0) {
                if (lane == __ffs(peers) - 1) atomicAdd(&sh.count[digit], __popc(peers));
                if (w) atomicAdd(&sh.mass[digit], w);
            }
        }
        __syncthreads();
        const int d = 255 - t;  // descending digits, one a thread
        const u64 wd = t < 256 ? (by_mass ? sh.mass[d] : sh.count[d]) : 0;
        u64 in_range;
        const u64 prior = block_exclusive(wd, sh, &in_range);
        const u64 rest = need - above;
        if (t < 256 && prior < rest && prior + wd >= rest) {
            sh.picked[0] = static_cast<u64>(d);
            sh.picked[1] = prior;
        }
        __syncthreads();
        const unsigned digit = static_cast<unsigned>(sh.picked[0]);
        above += sh.picked[1];
        ties = sh.count[digit];
        const unsigned width = shift + 8 >= 32 ? 0xffffffffu : ((1u << (shift + 8)) - 1u);
        const unsigned base_key = (lo & ~width) | (digit << shift);
        const unsigned top_key = base_key | ((1u << shift) - 1u);
        lo = max(lo, base_key);
        hi = min(hi, top_key);
        __syncthreads();
    }
    if (t == 0) {
        sh.picked[1] = above;
        sh.picked[2] = ties;
        sh.picked[3] = need;
    }
    __syncthreads();
    return lo;
}

struct Filters {
    unsigned kth;       // keys below it: out (top-k); 0: none
    unsigned boundary;  // top-p: keys above it kept, at it up to token `last_tie`; 0: none
    int last_tie;
    float min_p;
};

__device__ __forceinline__ u64 kept_weight(float s, int i, const Row& row, const Filters& f) {
    const unsigned key = key_of(s);
    if (key < f.kth || key < f.boundary || (key == f.boundary && i > f.last_tie)) return 0;
    const float w = exp_weight(__fsub_rn(s, row.best));
    if (w < f.min_p) return 0;
    return static_cast<u64>(floorf(__fmul_rn(w, row.scale)));
}

// floats [n, 7]: temperature (1 on greedy rows), top-p, min-p, greedy (0/1), repetition, presence,
// frequency penalties; ints [n, 2]: top-k (0: none), the row's index into seen / counts;
// u [n] in [0, 1 - 2**-52]; seen (uint8) / counts (int32) [prompts, vocab] or null;
// record: the tokens are outputs the penalties count; scale: 2**S (draws.scale_bits).
extern "C" __global__ void __launch_bounds__(THREADS)
sample_rows(const void* logits, long long row_stride, int vocab, const float* floats, const long long* ints,
            const double* uniforms, unsigned char* seen, int* counts, int record, float scale, float* scratch,
            long long* tokens) {
    __shared__ Shared sh;
    const int r = blockIdx.x, t = threadIdx.x;
    const float* f = floats + 7 * r;
    const float temperature = f[0], top_p = f[1], min_p = f[2], rep = f[4], presence = f[5], frequency = f[6];
    const bool greedy = f[3] != 0.0f;
    const long long top_k = ints[2 * r], at = ints[2 * r + 1];
    const char* row_logits = static_cast<const char*>(logits) +
                             row_stride * r * (LOGIT_DTYPE == 2 ? 4 : 2);
    const unsigned char* row_seen = seen ? seen + at * vocab : nullptr;
    const int* row_counts = counts ? counts + at * vocab : nullptr;
    float* s_row = scratch + static_cast<long long>(r) * vocab;

    // A: penalties, scores, the best of each
    float best_y = NEG_INF, best_s = NEG_INF;
    int arg_y = vocab, arg_s = vocab;
    for (int i = t; i < vocab; i += THREADS) {
        float y = logit_at(row_logits, i);
        if (row_seen && row_seen[i]) y = y < 0.0f ? __fmul_rn(y, rep) : __fdiv_rn(y, rep);
        if (row_counts) {
            const float c = static_cast<float>(row_counts[i]);
            y = __fsub_rn(__fsub_rn(y, __fmul_rn(frequency, c)), __fmul_rn(presence, c > 0.0f ? 1.0f : 0.0f));
        }
        const float yn = y != y ? NEG_INF : y;
        better(best_y, arg_y, yn, i);
        if (!greedy) {
            float s = __fdiv_rn(y, temperature);
            if (s != s) s = NEG_INF;
            s_row[i] = s;
            better(best_s, arg_s, s, i);
        }
    }
    block_best(best_y, arg_y, sh);
    long long token = arg_y < vocab ? arg_y : 0;
    if (!greedy) {
        block_best(best_s, arg_s, sh);
        token = arg_s < vocab ? arg_s : 0;
        __syncthreads();  // (the scores written above, read by every thread below)
        if (best_s > NEG_INF && best_s < POS_INF) {
            const Row row{s_row, vocab, best_s, scale};
            Filters fl{0u, 0u, vocab, min_p};
            if (top_k > 0 && top_k < vocab) fl.kth = select(row, sh, 0u, false, static_cast<u64>(top_k), -1.0f);
            if (top_p < 1.0f) {
                const unsigned boundary = select(row, sh, fl.kth, true, 0, top_p);
                const u64 above = sh.picked[1], ties = sh.picked[2], need = sh.picked[3];
                const u64 tie_weight = big_weight(score_of(boundary), row);
                const u64 keep = (need - above + tie_weight - 1) / tie_weight;
                fl.boundary = boundary;
                if (keep < ties) {
                    // the `keep` tied tokens of the lowest ids: the last of them
                    for (int k = t; k < MAX_TILES; k += THREADS) sh.tile_ties[k] = 0;
                    __syncthreads();
                    for (int i = t; i < vocab; i += THREADS)
                        if (key_of(s_row[i]) == boundary) atomicAdd(&sh.tile_ties[i / TILE], 1u);
                    __syncthreads();
                    if (t == 0) {
                        u64 before = 0;
                        int tile = 0;
                        const int last = (vocab - 1) / TILE;
                        while (tile < last && before + sh.tile_ties[tile] < keep) before += sh.tile_ties[tile++];
                        sh.picked[0] = tile;
                        sh.picked[1] = keep - before - 1;  // the last kept tie's rank in this tile
                    }
                    __syncthreads();
                    const int tile = static_cast<int>(sh.picked[0]);
                    const u64 rank = sh.picked[1];
                    const int first = tile * TILE + t * PER;
                    u64 mine = 0;
                    for (int e = 0; e < PER; ++e) {
                        const int i = first + e;
                        if (i < vocab && key_of(s_row[i]) == boundary) ++mine;
                    }
                    u64 all;
                    u64 ranked = block_exclusive(mine, sh, &all);
                    if (ranked <= rank && rank < ranked + mine) {
                        for (int e = 0; e < PER; ++e) {
                            const int i = first + e;
                            if (i < vocab && key_of(s_row[i]) == boundary) {
                                if (ranked == rank) {
                                    sh.bounds[0] = static_cast<unsigned>(i);
                                    break;
                                }
                                ++ranked;
                            }
                        }
                    }
                    __syncthreads();
                    fl.last_tie = static_cast<int>(sh.bounds[0]);
                    __syncthreads();
                }
            }
            // masses: each tile's kept W
            const int tiles = (vocab + TILE - 1) / TILE;
            for (int tile = 0; tile < tiles; ++tile) {
                u64 m = 0;
                for (int e = 0; e < PER; ++e) {
                    const int i = tile * TILE + e * THREADS + t;
                    if (i < vocab) m += kept_weight(s_row[i], i, row, fl);
                }
                m = warp_sum(m);
                if ((t & 31) == 0) sh.red[t >> 5] = m;
                __syncthreads();
                if (t == 0) {
                    u64 sum = 0;
                    for (int w = 0; w < WARPS; ++w) sum += sh.red[w];
                    sh.tile_mass[tile] = sum;
                }
                __syncthreads();
            }
            if (t < 32) {
                // the tile the draw lands in: lanes take consecutive runs of tiles
                const int per_lane = (tiles + 31) / 32;
                u64 own = 0;
                for (int k = 0; k < per_lane; ++k) {
                    const int tile = t * per_lane + k;
                    if (tile < tiles) own += sh.tile_mass[tile];
                }
                u64 inc = own;
                for (int o = 1; o < 32; o <<= 1) {
                    const u64 n = __shfl_up_sync(FULL, inc, o);
                    if (t >= o) inc += n;
                }
                const u64 total = __shfl_sync(FULL, inc, 31);
                if (total == 0) {
                    if (t == 0) sh.picked[0] = ~0ull;
                } else {
                    const u64 target = static_cast<u64>(floor(__dmul_rn(uniforms[r], static_cast<double>(total))));
                    u64 run = inc - own;
                    if (run <= target && target < inc) {
                        for (int k = 0; k < per_lane; ++k) {
                            const int tile = t * per_lane + k;
                            if (tile < tiles && target < run + sh.tile_mass[tile]) {
                                sh.picked[0] = tile;
                                sh.picked[1] = target - run;
                                break;
                            }
                            if (tile < tiles) run += sh.tile_mass[tile];
                        }
                    }
                }
            }
            __syncthreads();
            if (sh.picked[0] != ~0ull) {
                const int tile = static_cast<int>(sh.picked[0]);
                const u64 target = sh.picked[1];
                const int first = tile * TILE + t * PER;
                u64 w[PER];
                u64 mine = 0;
                for (int e = 0; e < PER; ++e) {
                    const int i = first + e;
                    w[e] = i < vocab ? kept_weight(s_row[i], i, row, fl) : 0;
                    mine += w[e];
                }
                u64 all;
                u64 run = block_exclusive(mine, sh, &all);
                if (run <= target && target < run + mine) {
                    for (int e = 0; e < PER; ++e) {
                        run += w[e];
                        if (run > target) {
                            sh.picked[2] = first + e;
                            break;
                        }
                    }
                }
                __syncthreads();
                token = static_cast<long long>(sh.picked[2]);
            }
        }
    }
    if (t == 0) {
        tokens[r] = token;
        if (record) {
            if (seen) seen[at * vocab + token] = 1;
            if (counts) atomicAdd(&counts[at * vocab + token], 1);
        }
    }
}
