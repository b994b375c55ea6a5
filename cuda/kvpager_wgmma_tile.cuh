// kvpager_wgmma_tile.cuh: the steps the wgmma attention kernels share
// (paged_prefill_sm90.cu, cascade_prefix_sm90.cu): the K/V tile gather into
// the 128-byte-swizzled layout, S = Q K^T, soft cap, the online softmax with
// O += P V, the copy pipeline (cp.async by every thread, or a producer
// warpgroup with mbarriers: WS) and the loop over a run of K/V tiles in each of
// its forms (plain, OVERLAP, WS, WS + OVERLAP), and the final row sums and
// float32 row stores. Each kernel keeps what is its own: the Q rows it gathers,
// the masks of its scores (a functor the loop calls after the soft cap) and
// where its rows go.
//
// Here too the knobs both kernels take (-D: WG, BN, STAGES, VN, OVERLAP, WS) with
// their defaults, and the constants and checks they derive. Include it after
// kvpager_common.cuh, kvpager_mma.cuh, kvpager_wgmma.cuh and the defaults of
// HEAD_DIM, BLOCK_SIZE and GROUP (the loader pastes headers and does not
// nest). Accumulator layout (m64nN, per thread): n8
// block n holds (row gid, columns 8n + 2 tig + {0,1}) at [4n], [4n + 1] and
// (row gid + 8, same columns) at [4n + 2], [4n + 3]. Functors are plain (not
// generic) lambdas: NVRTC 13.0 takes generic ones in device code for host functions.
#pragma once

#ifndef WG
#define WG 2  // warpgroups (64 query rows each) per CTA
#endif
#ifndef BN
#define BN 64  // K/V positions per tile (the N of S = Q K^T)
#endif
#ifndef STAGES
#define STAGES 3
#endif
#ifndef VN
#define VN HEAD_DIM  // N of one O += P V instruction: HEAD_DIM (one), or 64 (one per 64 dims; head dim 256)
#endif
#ifndef OVERLAP
#define OVERLAP 0  // 1: S of the next K/V tile runs during this tile's softmax (STAGES >= 3)
#endif
#ifndef PINGPONG
#define PINGPONG 1  // with WS and OVERLAP: the two MMA warpgroups take turns at issuing their MMAs
#endif
#ifndef WS
#define WS 0  // 1: a producer warpgroup copies K/V, the other two only compute (mbarriers, no CTA barrier)
#endif
#ifndef TMA
#define TMA 0  // 1 (with WS): tiles whose every position is visible come by TMA, one box per block piece
#endif
#ifndef PERSIST
#define PERSIST 0  // 1 (with WS, no OVERLAP): a CTA an SM walks many work items (the kernel's own loop)
#endif
#if TMA && !WS
#error "TMA loads are the producer warpgroup's (WS)"
#endif
#if PERSIST && (!WS || OVERLAP)
#error "PERSIST runs the producer warpgroup's plain loop (WS, no OVERLAP)"
#endif

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(__CUDACC_RTC__)
#error "the wgmma kernels need the sm_90a target"
#endif

constexpr int D = HEAD_DIM;
constexpr int BM = 64 * WG;
constexpr int NC = 128 * WG;            // consumer (MMA) threads
constexpr int NT = NC + (WS ? 128 : 0); // + the producer warpgroup
#if WS
// Registers move from the producer warpgroup to the consumers (setmaxnreg): the CTA is
// compiled for 65536 / 384 = 168 a thread, the producer keeps 56, the consumers get 224.
constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
#endif
constexpr int CPR = D / 8;              // 16-byte chunks per row
constexpr int KV_TILE = BN * D * 2;     // bytes of one K or V tile
static_assert(D == 64 || D == 128 || D == 256, "the wgmma kernels take head dims 64, 128 and 256");
static_assert(BN == 64 || BN == 128, "BN is 64 or 128");
static_assert(WG == 1 || WG == 2, "WG is 1 or 2");
static_assert(VN == D || VN == 64, "VN is HEAD_DIM or 64");
static_assert(!OVERLAP || STAGES >= 3, "OVERLAP keeps two tiles resident, and the copies run ahead: STAGES >= 3");
static_assert(!WS || WG == 2, "WS: two consumer warpgroups and a producer warpgroup");
#ifndef HCH
#define HCH GROUP  // query heads of a group a tile holds (paged_prefill_sm90.cu may cut a large group)
#endif
static_assert(HCH <= BM, "a tile holds at least one query token (member)");

// The dynamic shared memory of a CTA: the Q tile (BM rows), then STAGES K tiles and STAGES
// V tiles of BN rows, each in the SW128 layout, from the first 1024-byte boundary (the
// hardware applies the swizzle from address bits 7-9): pointers and shared addresses.
struct WgSmem {
    unsigned char *q, *k, *v;
    unsigned q_addr, k_addr, v_addr;
};
__device__ __forceinline__ WgSmem wg_smem(unsigned char* raw) {
    const unsigned raw_addr = smem_addr(raw);
    const unsigned base = (raw_addr + 1023u) & ~1023u;
    WgSmem sm;
    sm.q = raw + (base - raw_addr);
    sm.k = sm.q + BM * D * 2;
    sm.v = sm.k + STAGES * KV_TILE;
    sm.q_addr = base;
    sm.k_addr = base + BM * D * 2;
    sm.v_addr = sm.k_addr + STAGES * KV_TILE;
    return sm;
}

#if WS
// The stages' mbarriers (WS): full[s] = [s], empty[s] = [STAGES + s]; with PERSIST also the
// Q tile's, full at [2 * STAGES] and empty at [2 * STAGES + 1]. One array per CTA (a
// __shared__ variable of a function is static): every call returns the same.
__device__ __forceinline__ unsigned long long* wg_barriers() {
    __shared__ __align__(8) unsigned long long bars[2 * STAGES + (PERSIST ? 2 : 0)];
    return bars;
}

// Thread 0 sets up the mbarriers: full (128 producer arrivals: each producer thread's copies
// of the tile landed, signalled by cp.async itself, so the producer never waits for its
// copies; each consumer fences for the async proxy once it has waited), empty (NC consumer
// arrivals: its last reader's MMAs done), and with PERSIST the Q tile's alike (full: the
// producer's Q copies landed and its thread 0 stored the item's number, one arrival more;
// empty: both MMA warpgroups issued their last S on it). Then
// the CTA syncs.
__device__ __forceinline__ void wg_barriers_init(int tid) {
    unsigned long long* bars = wg_barriers();
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(smem_addr(&bars[s]), NT - NC);
            mbar_init(smem_addr(&bars[STAGES + s]), NC);
        }
#if PERSIST
        mbar_init(smem_addr(&bars[2 * STAGES]), NT - NC + 1);  // + the producer thread 0's hand-over
        mbar_init(smem_addr(&bars[2 * STAGES + 1]), NC);
#endif
    }
    __syncthreads();
}

// The producer's copies of the K/V tiles [t_begin, num_tiles) of a run, ``g`` counting the
// CTA's tiles on (tile g of the CTA goes to stage g % STAGES, once its last reader gave it
// back). ``me``: this thread's number among the producer's.
template <class Load>
__device__ __forceinline__ void wg_produce(Load& load, int me, int t_begin, int num_tiles, int& g) {
    unsigned long long* full_bar = wg_barriers();
    unsigned long long* empty_bar = full_bar + STAGES;
    for (int t = t_begin; t < num_tiles; ++t, ++g) {
        const int stage = g % STAGES;
        if (g >= STAGES) mbar_wait(smem_addr(&empty_bar[stage]), ((g / STAGES) - 1) & 1);
        // true: the load arrived itself (TMA); else once this thread's cp.async copies have landed
        if (!load(t, stage, me, NT - NC)) cp_async_mbar_arrive(smem_addr(&full_bar[stage]));
    }
}
#endif

// A fresh accumulator: O = 0, row max -inf, row sum 0 (both of this thread's rows).
__device__ __forceinline__ void wg_init(float* o, float* m, float* l) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.f;
}

// K/V tile t (positions t * BN ...) of ``table``'s sequence -> the stage at ks / vs: the
// positions in [lo, hi), the rest zero-filled; copied by ``n`` threads of which this is
// number ``me`` (``n`` is a constant at every call, after inlining).
__device__ __forceinline__ void wg_load_kv(unsigned char* ks, unsigned char* vs, const st_t* __restrict__ pool,
                                           const int* __restrict__ table, long long block_stride,
                                           long long k_off, long long v_off, int t, int lo, int hi,
                                           int me, int n) {
#pragma unroll 4
    for (int c = me; c < BN * CPR; c += n) {
        const int r = c / CPR, ch = c % CPR;
        const int pos = t * BN + r;
        const bool ok = pos < hi && pos >= lo;
        long long row = 0;
        if (ok) row = (long long)table[pos / BLOCK_SIZE] * block_stride + (pos % BLOCK_SIZE) * D + ch * 8;
        const int off = sw128_offset(BN, r, ch);
        cp_async16(ks + off, pool + (ok ? row + k_off : 0), ok);
        cp_async16(vs + off, pool + (ok ? row + v_off : 0), ok);
    }
}

#if TMA
// Rows of one TMA box: a block, or the part of one a tile holds. A box lands on a 1024-byte
// boundary of its region (8-row atoms), where the map's 128-byte swizzle is sw128_offset's.
constexpr int TMA_ROWS = BLOCK_SIZE < BN ? BLOCK_SIZE : BN;
static_assert(TMA_ROWS % 8 == 0, "TMA boxes are whole 8-row atoms of the SW128 layout");

// K/V tile t, every position of it visible, by TMA -> the stage at ks / vs (shared addresses).
// ``map``: the pool as [rows of HEAD_DIM values] (a row: one position of one kv head of one
// layer's K or V); block b's K rows of this layer and head start at b * block_rows + k_row, its
// V rows at b * block_rows + v_row. Producer thread ``me`` 0 asks for the tile's bytes on the
// stage's full barrier ``bar`` and issues one box per (piece of a block, K or V, 64-value
// region); the others arrive (the barrier counts every producer thread).
__device__ __forceinline__ void wg_tma_kv(unsigned ks, unsigned vs, const void* map, const int* __restrict__ table,
                                          int block_rows, int k_row, int v_row, int t, unsigned bar, int me) {
    if (me != 0) {
        mbar_arrive(bar);
        return;
    }
    mbar_arrive_expect_tx(bar, 2 * KV_TILE);
#pragma unroll
    for (int j = 0; j < BN / TMA_ROWS; ++j) {
        const int pos = t * BN + j * TMA_ROWS;
        const int row = table[pos / BLOCK_SIZE] * block_rows + pos % BLOCK_SIZE;
#pragma unroll
        for (int reg = 0; reg < D / 64; ++reg) {
            const unsigned off = reg * BN * 128 + j * TMA_ROWS * 128;
            tma_load_2d(ks + off, map, reg * 64, row + k_row, bar);
            tma_load_2d(vs + off, map, reg * 64, row + v_row, bar);
        }
    }
}
#endif

// K/V tile t of the positions [lo, hi) of ``table``'s sequence -> stage ``stage``: with TMA,
// a tile whose every position is in range comes by TMA (wg_tma_kv; returns true: the load
// arrived on the stage's full barrier itself); else cp.async, the rest zero-filled (false).
__device__ __forceinline__ bool wg_load_tile(const WgSmem& sm, int stage, const st_t* __restrict__ pool,
                                             const void* map, const int* __restrict__ table,
                                             long long block_stride, long long k_off, long long v_off, int t,
                                             int lo, int hi, int me, int n) {
#if TMA
    if (t * BN >= lo && (t + 1) * BN <= hi) {
        wg_tma_kv(sm.k_addr + stage * KV_TILE, sm.v_addr + stage * KV_TILE, map, table, (int)(block_stride / D),
                  (int)(k_off / D), (int)(v_off / D), t, smem_addr(&wg_barriers()[stage]), me);
        return true;
    }
#endif
    wg_load_kv(sm.k + stage * KV_TILE, sm.v + stage * KV_TILE, pool, table, block_stride, k_off, v_off, t, lo, hi,
               me, n);
    return false;
}

// S = Q K^T of this warpgroup's 64 Q rows at q_wg (K-major A operand, SBO 1024) and the K
// tile at k_st (issued and committed, not waited for): D / 16 k-steps, k-step kk is +32
// bytes within a 64-value region.
__device__ __forceinline__ void wg_issue_s(float* s, unsigned q_wg, unsigned k_st) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned qa = q_wg + (kk >> 2) * BM * 128 + (kk & 3) * 32;
        const unsigned ka = k_st + (kk >> 2) * BN * 128 + (kk & 3) * 32;
        wgmma_ss<BN>(s, sw128_desc(qa, 16, 1024), sw128_desc(ka, 16, 1024), kk > 0);
    }
    wgmma_commit();
}

// The online softmax (exp2) of the soft-capped, masked scores s of one tile, first step: the
// new row max m, the factors c that rescale what O and l held so far (l is rescaled here),
// and u, the max in exp2 units.
__device__ __forceinline__ void wg_softmax_max(const float* s, float* m, float* l, float* c, float* u,
                                               float scale_log2) {
    // Row max in raw score units (scale > 0 keeps the order).
    float mx0 = m[0], mx1 = m[1];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * n], s[4 * n + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * n + 2], s[4 * n + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    u[0] = mx0 == NEG_INF ? 0.f : mx0 * scale_log2;
    u[1] = mx1 == NEG_INF ? 0.f : mx1 * scale_log2;
    c[0] = exp2f(m[0] * scale_log2 - u[0]);
    c[1] = exp2f(m[1] * scale_log2 - u[1]);
    m[0] = mx0; m[1] = mx1;
    l[0] *= c[0]; l[1] *= c[1];
}

// Second step: P = exp2(S * scale - u), added into l, and either packed straight into 16-bit
// A fragments pa (PACK: 16 positions per k-step) or written back over s.
template <bool PACK>
__device__ __forceinline__ void wg_softmax_exp(float* s, float* l, const float* u, float scale_log2,
                                               unsigned (*pa)[4]) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
        const float e0 = exp2f(fmaf(s[4 * n], scale_log2, -u[0]));
        const float e1 = exp2f(fmaf(s[4 * n + 1], scale_log2, -u[0]));
        const float e2 = exp2f(fmaf(s[4 * n + 2], scale_log2, -u[1]));
        const float e3 = exp2f(fmaf(s[4 * n + 3], scale_log2, -u[1]));
        l[0] += e0 + e1; l[1] += e2 + e3;
        if constexpr (PACK) {
            pa[n >> 1][(n & 1) * 2 + 0] = pack2(e0, e1);
            pa[n >> 1][(n & 1) * 2 + 1] = pack2(e2, e3);
        } else {
            s[4 * n] = e0; s[4 * n + 1] = e1; s[4 * n + 2] = e2; s[4 * n + 3] = e3;
        }
    }
}

// O *= c, row by row (c[0]: this thread's row gid, c[1]: row gid + 8).
__device__ __forceinline__ void wg_rescale(float* o, const float* c) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[4 * n] *= c[0]; o[4 * n + 1] *= c[0]; o[4 * n + 2] *= c[1]; o[4 * n + 3] *= c[1];
    }
}

// P (the exps in s: wg_softmax_exp<false>) packed into 16-bit A fragments.
__device__ __forceinline__ void wg_pack_p(const float* s, unsigned (*pa)[4]) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
        pa[n >> 1][(n & 1) * 2 + 0] = pack2(s[4 * n], s[4 * n + 1]);
        pa[n >> 1][(n & 1) * 2 + 1] = pack2(s[4 * n + 2], s[4 * n + 3]);
    }
}

// O += P V with the V tile at v_st (issued and committed, not waited for): BN / 16 k-steps
// of 16 positions (+2048 bytes each); N = VN values per instruction, LBO = a region (the
// next 64 dims), SBO 1024 (the next 8 positions).
__device__ __forceinline__ void wg_issue_pv(float* o, unsigned (*pa)[4], unsigned v_st) {
    fence_regs<D / 2>(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int c = 0; c < D / VN; ++c)
            wgmma_rs<VN>(o + c * (VN / 2), pa[kk], sw128_desc(v_st + c * (VN / 64) * BN * 128 + kk * 2048, BN * 128, 1024));
    wgmma_commit();
}

// Soft cap and the kernel's masks (mask(s, t)) on the scores of tile t.
template <class Mask>
__device__ __forceinline__ void wg_scores(float* s, int t, float softcap, Mask& mask) {
    if (softcap > 0.f) {
        const float inv = 1.f / softcap;
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = softcap * tanhf(s[i] * inv);
    }
    mask(s, t);
}

// Soft cap, masks and the online softmax of tile t, then O += P V (issued, not waited for).
template <class Mask>
__device__ __forceinline__ void wg_tile(float* s, int t, unsigned v_st, float* o, float* m, float* l,
                                        float softcap, float scale_log2, Mask& mask) {
    wg_scores(s, t, softcap, mask);
    float c[2], u[2];
    unsigned pa[BN / 16][4];
    wg_softmax_max(s, m, l, c, u, scale_log2);
    wg_rescale(o, c);
    wg_softmax_exp<true>(s, l, u, scale_log2, pa);
    wg_issue_pv(o, pa, v_st);
}

// Before the MMAs, after the consumer threads issued their Q tile's copies: without WS,
// every thread issues the copies of the run's first STAGES - 1 tiles (load(t, stage, me, n),
// which returns true where it arrived on the stage's full barrier itself: TMA, WS only;
// the first group also holds the Q tile). With WS the mbarriers are set up
// (wg_barriers_init), the producer warpgroup copies every tile of the run (wg_produce) and
// this returns true (its work is done: the caller returns), the consumers take its
// registers and wait for the Q tile.
template <class Load>
__device__ __forceinline__ bool wg_start(Load& load, int tid, int t_begin, int num_tiles) {
#if !WS
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < num_tiles) load(t_begin + s, s, tid, NT);
        cp_commit();
    }
    return false;
#else
    wg_barriers_init(tid);
    if (tid >= NC) {  // the producer warpgroup
        setmaxnreg_dec<PRODUCER_REGS>();
        int g = 0;
        wg_produce(load, tid - NC, t_begin, num_tiles, g);
        cp_commit();
        cp_wait<0>();  // every copy of this thread landed before it leaves
        return true;
    }
    setmaxnreg_inc<CONSUMER_REGS>();
    cp_commit();
    cp_wait<0>();  // the Q tile
    fence_proxy_async();
    named_barrier_sync(1, NC);
    return false;
#endif
}

// The consumers' loop over K/V tiles [t_begin, num_tiles) (stage i % STAGES holds the run's
// tile i; K tiles at k_addr, V tiles at v_addr, KV_TILE bytes apart): S = Q K^T, wg_tile,
// each tile's MMAs waited for before its stage is given back. Without WS every thread also
// issues the copies STAGES - 1 tiles ahead (load), with CTA barriers between them. With
// PERSIST the run's tile i is the CTA's tile base + i (wg_produce's count), and once S of
// the run's last tile is done the Q tile is given back (its empty mbarrier).
template <class Load, class Mask>
__device__ __forceinline__ void wg_attend(float* o, float* m, float* l, unsigned q_wg, unsigned k_addr,
                                          unsigned v_addr, int t_begin, int num_tiles, float softcap,
                                          float scale_log2, Load& load, Mask& mask, int tid, int base = 0) {
    int st = 0;  // the stage of tile t
#if WS
    unsigned long long* full_bar = wg_barriers();
    unsigned long long* empty_bar = full_bar + STAGES;
#endif
#if WS && OVERLAP
    // FlashAttention-3's consumer loop: S of tile t and O += P V of tile t - 1 are issued
    // together, so the softmax of tile t runs while P V of tile t - 1 is on the tensor cores.
    // With PINGPONG the two MMA warpgroups take turns at issuing (named barriers 2 and 3:
    // warpgroup 1 lets warpgroup 0 go first, then each hands the turn over once its MMAs are
    // issued), so one's softmax runs while the other's MMAs do. Held: S of tile t, P of
    // tile t - 1 and the stages of both (released once P V of the tile is done).
    float s[BN / 2], c[2], u[2];
    unsigned pa[BN / 16][4];
    int pst = 0;  // the stage of tile t - 1
#if PINGPONG
    const int wg = tid >> 7;
    if (wg == 1) named_barrier_arrive(2, NC);
#define WG_TURN_BEGIN named_barrier_sync(2 + wg, NC)
#define WG_TURN_END named_barrier_arrive(3 - wg, NC)
#else
#define WG_TURN_BEGIN
#define WG_TURN_END
#endif
    // The first tile alone (no P V to issue with it), so that every wait below is unconditional
    // (ptxas otherwise injects a full wait of its own).
    if (t_begin < num_tiles) {
        mbar_wait(smem_addr(&full_bar[0]), 0);
        fence_proxy_async();  // the producer's copies (generic proxy) -> visible to wgmma (async proxy)
        WG_TURN_BEGIN;
        wg_issue_s(s, q_wg, k_addr);
        WG_TURN_END;
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
        wg_scores(s, t_begin, softcap, mask);
        wg_softmax_max(s, m, l, c, u, scale_log2);
        wg_softmax_exp<false>(s, l, u, scale_log2, pa);
        wg_pack_p(s, pa);
        st = 1;
    }
    for (int t = t_begin + 1, i = 1; t < num_tiles; ++t, ++i) {
        mbar_wait(smem_addr(&full_bar[st]), (i / STAGES) & 1);
        fence_proxy_async();
        WG_TURN_BEGIN;
        wg_issue_s(s, q_wg, k_addr + st * KV_TILE);
        wg_rescale(o, c);  // the factors of tile t - 1's softmax, before its P V adds in
        wg_issue_pv(o, pa, v_addr + pst * KV_TILE);
        WG_TURN_END;
        wgmma_wait<1>();  // S of tile t
        fence_regs<BN / 2>(s);
        wg_scores(s, t, softcap, mask);
        wg_softmax_max(s, m, l, c, u, scale_log2);
        wg_softmax_exp<false>(s, l, u, scale_log2, pa);
        wgmma_wait<0>();  // P V of tile t - 1: its registers and stage are free
        fence_regs<D / 2>(o);
        mbar_arrive(smem_addr(&empty_bar[pst]));
        wg_pack_p(s, pa);
        pst = st;
        st = st + 1 == STAGES ? 0 : st + 1;
    }
#undef WG_TURN_BEGIN
#undef WG_TURN_END
    if (t_begin < num_tiles) {
        wg_rescale(o, c);
        wg_issue_pv(o, pa, v_addr + pst * KV_TILE);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        mbar_arrive(smem_addr(&empty_bar[pst]));
    }
#if PINGPONG
    if (wg == 0) named_barrier_sync(2, NC);  // warpgroup 1's first hand-over, left over
#endif
#elif WS
    st = base % STAGES;
    for (int t = t_begin, i = base; t < num_tiles; ++t, ++i) {
        mbar_wait(smem_addr(&full_bar[st]), (i / STAGES) & 1);
        fence_proxy_async();
        float s[BN / 2];
        wg_issue_s(s, q_wg, k_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
#if PERSIST
        if (t + 1 == num_tiles) mbar_arrive(smem_addr(&full_bar[2 * STAGES + 1]));  // Q read for the last time
#endif
        wg_tile(s, t, v_addr + st * KV_TILE, o, m, l, softcap, scale_log2, mask);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        mbar_arrive(smem_addr(&empty_bar[st]));
        st = st + 1 == STAGES ? 0 : st + 1;
    }
#elif OVERLAP
    // S of tile t + 1 runs on the tensor cores while this warpgroup's softmax of tile t runs.
    // Tiles t and t + 1 are resident at once, so the copies run STAGES - 2 tiles ahead.
    float s[BN / 2], sn[BN / 2];
    if (t_begin < num_tiles) {
        cp_wait<STAGES - 2>();  // tile t_begin (and the Q tile) landed
        fence_proxy_async();
        __syncthreads();
        wg_issue_s(s, q_wg, k_addr);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
    }
    for (int t = t_begin; t < num_tiles; ++t) {
        const int nst = st + 1 == STAGES ? 0 : st + 1;
        cp_wait<STAGES - 3>();  // tile t + 1 landed
        fence_proxy_async();
        __syncthreads();        // ... for every thread; and tile t - 1's stage is read by no one
        if (t + STAGES - 1 < num_tiles) load(t + STAGES - 1, st == 0 ? STAGES - 1 : st - 1, tid, NT);
        cp_commit();
        const bool more = t + 1 < num_tiles;
        if (more) wg_issue_s(sn, q_wg, k_addr + nst * KV_TILE);
        wg_tile(s, t, v_addr + st * KV_TILE, o, m, l, softcap, scale_log2, mask);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        fence_regs<BN / 2>(sn);
        if (more) {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) s[i] = sn[i];
        }
        st = nst;
    }
#else
    for (int t = t_begin; t < num_tiles; ++t) {
        if (t + STAGES - 1 < num_tiles) load(t + STAGES - 1, st == 0 ? STAGES - 1 : st - 1, tid, NT);
        cp_commit();
        cp_wait<STAGES - 1>();
        fence_proxy_async();  // this thread's landed copies -> visible to wgmma
        __syncthreads();
        float s[BN / 2];
        wg_issue_s(s, q_wg, k_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
        wg_tile(s, t, v_addr + st * KV_TILE, o, m, l, softcap, scale_log2, mask);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        __syncthreads();  // this stage is refilled STAGES - 1 iterations later
        st = st + 1 == STAGES ? 0 : st + 1;
    }
#endif
    cp_wait<0>();
}

// A row's softmax sum: this thread's share summed over its quad (all lanes must call it).
__device__ __forceinline__ float wg_row_sum(float l) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return l;
}

// This thread's values of accumulator row hf (0: gid, 1: gid + 8) times inv, as float32
// into the row of D values at dst.
__device__ __forceinline__ void wg_store_f32(float* dst, const float* o, int hf, float inv, int tig) {
    float2* d2 = reinterpret_cast<float2*>(dst) + tig;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
        d2[n * 4] = make_float2(o[4 * n + 2 * hf] * inv, o[4 * n + 2 * hf + 1] * inv);
}
