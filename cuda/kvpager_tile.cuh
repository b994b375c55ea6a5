// kvpager_tile.cuh: what paged_prefill.cu and cascade_prefix.cu share (4
// warps, MT m-tiles of 16 query rows per warp, BN K/V positions per tile,
// mma.sync m16n8k16 with float32 accumulators): the shared-memory layout, the
// K/V stages' loads and their FP8 conversion, the masks of a position range,
// S = Q K^T, the soft cap, the online softmax and O += P V.
//
// Include after kvpager_common.cuh and kvpager_mma.cuh and after defining the
// constexprs HD (the pool's head dim), D (the head dims one warp's MMAs cover),
// BM, BN, MT, LD (padded smem row, in elements), WR (rows per warp) and NT
// (threads per CTA), and the macros STAGES and BLOCK_SIZE. Fragment layouts are mma.sync's: a
// lane holds rows gid and gid + 8 of each m-tile, columns 2 tig and 2 tig + 1
// of each 8-wide n-tile.
#pragma once

// Shared memory: the Q tile ([BM][LD]), then the K/V stages that cp.async fills, from which
// the MMAs read: STAGES K tiles then STAGES V tiles ([BN][LD] each); with an FP8 pool one
// converted K and one V tile ([BN][LD]), then the stages as stored (STAGES x (BN K rows, BN V
// rows) of D bytes).
#if KV_FP8
constexpr int TILE_SLD = D;             // a staged row, in elements
constexpr int TILE_SSTAGE = 2 * BN * D;  // stage to stage
#else
constexpr int TILE_SLD = LD;
constexpr int TILE_SSTAGE = BN * LD;
#endif
struct TileSmem {
    kv_t* q;            // the Q tile
    kv_t* k;            // the K tiles the MMAs read (stage 0's; FP8: the converted tile)
    kv_t* v;            // the V tiles
    st_t* rk;           // stage 0's K rows as cp.async fills them
    st_t* rv;           // stage 0's V rows
};

__device__ __forceinline__ TileSmem tile_smem(unsigned char* raw) {
    kv_t* q = reinterpret_cast<kv_t*>(raw);
    kv_t* k = q + BM * LD;
#if KV_FP8
    kv_t* v = k + BN * LD;
    st_t* rk = reinterpret_cast<st_t*>(v + BN * LD);
    return {q, k, v, rk, rk + BN * D};
#else
    kv_t* v = k + STAGES * BN * LD;
    return {q, k, v, k, v};
#endif
}

// cp.async of K/V tile t (positions t * BN ...) of a sequence's table into stage ``stage``:
// the positions in [lo, hi), the rest zero-filled. Every thread of the CTA.
__device__ __forceinline__ void tile_load_kv(const TileSmem& sm, int stage, const st_t* __restrict__ pool,
                                             const int* __restrict__ table, const PoolHead& ph, int t, int lo,
                                             int hi, int tid) {
    constexpr int SCPR = HD / ST_VEC;  // 16-byte chunks per stored K/V row
    st_t* ks = sm.rk + stage * TILE_SSTAGE;
    st_t* vs = sm.rv + stage * TILE_SSTAGE;
#pragma unroll
    for (int c = tid; c < BN * SCPR; c += NT) {
        const int r = c / SCPR, col = (c % SCPR) * ST_VEC;
        const int pos = t * BN + r;
        const bool ok = pos >= lo && pos < hi;
        long long row = 0;
        if (ok) row = (long long)table[pos / BLOCK_SIZE] * ph.block_stride + (pos % BLOCK_SIZE) * HD + col;
        cp_async16(ks + r * TILE_SLD + col, pool + (ok ? row + ph.k_off : 0), ok);
        cp_async16(vs + r * TILE_SLD + col, pool + (ok ? row + ph.v_off : 0), ok);
    }
}

#if KV_FP8 && KV_DTYPE == 1
__shared__ unsigned tile_q_amax;  // |q| of the Q tile, as float bits (non-negative: ordered as ints)
#endif

// An FP8 pool's (layer, kv head) K and V scales (x, y); 1 for a 16-bit pool. Before the
// K/V loop (it clears what tile_stage's first call reads, after the loop's first barrier).
__device__ __forceinline__ float2 tile_scales(const float* __restrict__ kv_scales, int layer, int num_kv_heads,
                                              int h, int tid) {
#if KV_FP8
#if KV_DTYPE == 1
    if (tid == 0) tile_q_amax = 0u;
#endif
    return make_float2(kv_scales[(layer * 2) * num_kv_heads + h], kv_scales[(layer * 2 + 1) * num_kv_heads + h]);
#else
    return make_float2(1.f, 1.f);
#endif
}

#if KV_FP8
#if KV_DTYPE == 1
// The bfloat16 Q tile in shared memory ([BM][LD]) -> float16, times 2^p with p
// from the tile's largest |q| (q_range_exp), so every value above 2^-29 of
// that largest stays exact; returns p. Called by every thread of the CTA;
// ``q_amax`` (shared) must be 0 on entry; it synchronises the CTA.
__device__ __forceinline__ int tile_q_to_f16(kv_t* Qs, unsigned* q_amax, int tid) {
    float amax = 0.f;
    for (int c = tid; c < BM * D / 2; c += NT) {
        const unsigned w = reinterpret_cast<const unsigned*>(Qs)[(c / (D / 2)) * (LD / 2) + c % (D / 2)];
        amax = fmaxf(amax, fmaxf(fabsf(__uint_as_float(w << 16)), fabsf(__uint_as_float(w & 0xffff0000u))));
    }
    atomicMax(q_amax, __float_as_uint(amax));
    __syncthreads();
    const int p = q_range_exp(__uint_as_float(*q_amax));
    const float mul = exp2i(p);
    for (int c = tid; c < BM * D / 2; c += NT) {
        unsigned* w = reinterpret_cast<unsigned*>(Qs) + (c / (D / 2)) * (LD / 2) + c % (D / 2);
        *w = bf16x2_to_f16x2(*w, mul);
    }
    return p;
}
#endif

// A stage's FP8 rows as stored (BN K rows then BN V rows of D bytes) -> the
// float16 tiles Ks and Vs ([BN][LD]), 16 values per chunk, exactly.
__device__ __forceinline__ void tile_kv_to_f16(const st_t* raw, kv_t* Ks, kv_t* Vs, int tid) {
    constexpr int SCPR = D / ST_VEC;  // 16-byte chunks per stored row
    for (int c = tid; c < 2 * BN * SCPR; c += NT) {
        const int r = c / SCPR, col = (c % SCPR) * 16;  // r: K rows, then V rows
        const uint4 w = *reinterpret_cast<const uint4*>(raw + r * D + col);
        uint4 a, b;
        a.x = fp8x2_to_f16x2(w.x); a.y = fp8x2_to_f16x2(w.x >> 16);
        a.z = fp8x2_to_f16x2(w.y); a.w = fp8x2_to_f16x2(w.y >> 16);
        b.x = fp8x2_to_f16x2(w.z); b.y = fp8x2_to_f16x2(w.z >> 16);
        b.z = fp8x2_to_f16x2(w.w); b.w = fp8x2_to_f16x2(w.w >> 16);
        kv_t* dst = (r < BN ? Ks + r * LD : Vs + (r - BN) * LD) + col;
        *reinterpret_cast<uint4*>(dst) = a;
        *reinterpret_cast<uint4*>(dst + 8) = b;
    }
}
#endif

// The K and V tiles the MMAs read from stage ``st``, once the CTA's barrier after its
// cp.async wait has passed: the stage itself; with an FP8 pool the stage converted
// (exactly) into the float16 tiles, then another barrier, and on the ``first`` tile a
// bfloat16 Q tile converted too, its power-of-two scale taken off ``k_scale``.
__device__ __forceinline__ void tile_stage(const TileSmem& sm, int st, bool first, float& k_scale, int tid,
                                           const kv_t*& ks, const kv_t*& vs) {
#if KV_FP8
#if KV_DTYPE == 1
    if (first) k_scale *= exp2i(-tile_q_to_f16(sm.q, &tile_q_amax, tid));  // the Q tile, landed with stage 0
#endif
    tile_kv_to_f16(sm.rk + st * TILE_SSTAGE, sm.k, sm.v, tid);
    __syncthreads();
    ks = sm.k;
    vs = sm.v;
#else
    ks = sm.k + st * BN * LD;
    vs = sm.v + st * BN * LD;
#endif
}

// Scores of the positions outside [lo, hi) -> NEG_INF (only a tile that reaches past either).
__device__ __forceinline__ void tile_mask_outside(float (&s)[MT][BN / 8][4], int t, int lo, int hi, int lane) {
    if (t * BN >= lo && (t + 1) * BN <= hi) return;
    const int tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kp = t * BN + n * 8 + tig * 2 + e;
                if (kp < lo || kp >= hi) {
                    s[mt][n][e] = NEG_INF;
                    s[mt][n][2 + e] = NEG_INF;
                }
            }
}

// Raw scores s (q . k) -> softcap * tanh(s / softcap) where ``softcap`` > 0 (the host passes cap / scale).
__device__ __forceinline__ void tile_softcap(float (&s)[MT][BN / 8][4], float softcap) {
    if (softcap > 0.f) {
        const float inv = 1.f / softcap;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][n][e] = softcap * tanhf(s[mt][n][e] * inv);
    }
}

// S = Q K^T of the warp's MT m-tiles against the BN rows of ``ks`` ([BN][LD]),
// raw q . k (no scale), then times ``k_scale`` (an FP8 pool's K scale; 1
// otherwise) and soft-capped when ``softcap`` > 0 (the host passes cap / scale).
__device__ __forceinline__ void tile_scores(float (&s)[MT][BN / 8][4], const kv_t* Qs, const kv_t* ks,
                                            int warp, int lane, float k_scale, float softcap) {
    const int mi = lane >> 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            ldsm_x4(a[mt], Qs + (warp * WR + mt * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
            unsigned bk[4];
            ldsm_x4(bk, ks + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * LD + kk * 16 + (mi & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(s[mt][2 * np], a[mt], bk[0], bk[1]);
                mma16816(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
            }
        }
    }
#if KV_FP8
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][n][e] *= k_scale;  // q . k of the dequantised K
#endif
    tile_softcap(s, softcap);
}

// The online softmax over the masked scores ``s`` (NEG_INF: masked), in exp2
// with ``scale_log2``: the running row max ``m`` (raw score units) and sum
// ``l``, ``o`` rescaled, then O += P V with P packed straight into A fragments
// and V ([BN][LD]) read transposed by ldmatrix.
__device__ __forceinline__ void tile_softmax_pv(float (&s)[MT][BN / 8][4], float (&o)[MT][D / 8][4],
                                                float (&m)[MT][2], float (&l)[MT][2], const kv_t* vs,
                                                float scale_log2, int lane) {
    const int mi = lane >> 3;
    unsigned pa[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        // Row max in raw score units (scale > 0 keeps the order).
        float mx0 = m[mt][0], mx1 = m[mt][1];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float u0 = mx0 == NEG_INF ? 0.f : mx0 * scale_log2;
        const float u1 = mx1 == NEG_INF ? 0.f : mx1 * scale_log2;
        const float c0 = exp2f(m[mt][0] * scale_log2 - u0), c1 = exp2f(m[mt][1] * scale_log2 - u1);
        m[mt][0] = mx0; m[mt][1] = mx1;
        l[mt][0] *= c0; l[mt][1] *= c1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[mt][n][0] *= c0; o[mt][n][1] *= c0; o[mt][n][2] *= c1; o[mt][n][3] *= c1;
        }
        // P = exp2(S * scale - m * scale), packed straight into A fragments for P V.
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            const float e0 = exp2f(fmaf(s[mt][n][0], scale_log2, -u0));
            const float e1 = exp2f(fmaf(s[mt][n][1], scale_log2, -u0));
            const float e2 = exp2f(fmaf(s[mt][n][2], scale_log2, -u1));
            const float e3 = exp2f(fmaf(s[mt][n][3], scale_log2, -u1));
            l[mt][0] += e0 + e1; l[mt][1] += e2 + e3;
            pa[mt][n >> 1][(n & 1) * 2 + 0] = pack2_mma(e0, e1);
            pa[mt][n >> 1][(n & 1) * 2 + 1] = pack2_mma(e2, e3);
        }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            unsigned bv[4];
            ldsm_x4_t(bv, vs + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * LD + np * 16 + (mi >> 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(o[mt][2 * np], pa[mt][kk], bv[0], bv[1]);
                mma16816(o[mt][2 * np + 1], pa[mt][kk], bv[2], bv[3]);
            }
        }
    }
}
