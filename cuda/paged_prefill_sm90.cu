// paged_prefill_sm90.cu: multi-token paged attention (prefill, chunked prefill on
// top of a cached prefix) on Hopper's warpgroup MMA (wgmma, sm_90a only),
// float16 / bfloat16 pools, float32 accumulate. Same signature, semantics and
// tiles list as paged_prefill.cu (num_work added; read its header for the causal rule, the GQA
// rows, window, soft cap, own_start and the cascade's partial states); FP8
// pools and other head dims use paged_prefill.cu.
//
// A CTA owns a query tile of BM = 64 * WG rows (row r: query token j0 + r /
// HCH, query head kv_head * GROUP + chunk * HCH + r % HCH; HCH = GROUP unless a
// large group is cut into chunks), one warpgroup (4 warps) per 64 rows. All its threads gather the sequence's K/V tiles of BN positions
// through the block table with cp.async (16 bytes, rows outside the visible
// range zero-filled) into shared memory in wgmma's 128-byte-swizzled layout
// (kvpager_wgmma.cuh), STAGES deep. Each warpgroup computes S = Q K^T with Q and
// K from shared memory (K token-major: the K-major B operand), the online
// softmax (exp2) on the accumulator registers, and O += P V with P from
// registers (the A fragment) and V from shared memory (token-major: the
// MN-major, transposed B operand). WS=1 (warp specialisation, FA3 style): a
// third, producer warpgroup does all the copies (setmaxnreg gives its registers
// to the two MMA warpgroups) and hands each stage over through mbarriers, full
// (cp.async arrives there itself once a producer thread's copies of the stage
// landed, so the producer never waits on its copies) and empty (both warpgroups'
// MMAs on it done), so the warpgroups never wait on one another. OVERLAP=1: S of
// the next tile is issued before this tile's softmax, which then runs while the
// tensor cores work; with WS it is FlashAttention-3's loop (S of tile t issued
// with P V of tile t - 1; PINGPONG: the two MMA warpgroups take turns at issuing).
// TMA=1 (with WS): the producer's tiles whose every position is visible (all but a
// run's first and last, mostly) come by TMA instead, one 2-D box per block (or per
// the part of one a tile holds), K and V, and 64-value region, from a tensor map of
// the whole pool as rows of HEAD_DIM values (kv_map, made by cupy_tma.py), landing
// in the same swizzled layout; one producer thread issues them, with the tile's
// byte count on the stage's full barrier. Boundary tiles keep cp.async's zero fill.
// PERSIST=1 (with WS, no OVERLAP): a grid of about one CTA an SM, each walking work
// items (query tile, kv head) of num_work (the planner's order: a K/V stream's items side
// by side, longest first), its first blockIdx.x, each next from a counter in global memory
// (work_counter, zero between launches), so CTAs that start late take fewer items;
// the producer also copies each item's Q tile (its own full and empty mbarriers), so
// the next item's Q and K/V tiles load under this item's last tiles and its output.
// The gather, the MMAs, the softmax and each form of the loop are
// kvpager_wgmma_tile.cuh's (shared with cascade_prefix_sm90.cu); the Q rows, the
// masks (causal, own start, window) and the output are this kernel's.
//
// Grid: x = query tile, y = kv head * NHC + head chunk (PERSIST: x = CTAs, y = 1); NT = 128 * WG threads
// (+ 128 with WS). The signature is paged_prefill.cu's with num_work and work_counter after kv_map.
// Dynamic shared memory: (BM + 2 * STAGES * BN) * HEAD_DIM * 2 + 1024 bytes (the
// 1024: the layout's regions start on 1024-byte boundaries).
#include "kvpager_common.cuh"
#include "kvpager_mma.cuh"
#include "kvpager_wgmma.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef GROUP
#define GROUP 4
#endif
#if KV_DTYPE == 2 || KV_FP8
#error "paged_prefill_sm90.cu is for float16 / bfloat16 pools; FP8 and float32 use paged_prefill.cu / paged_decode.cu"
#endif
// kvpager_wgmma_tile.cuh: the knobs (WG, BN, STAGES, VN, OVERLAP, WS), constants and shared steps
#include "kvpager_wgmma_tile.cuh"
// HCH (kvpager_wgmma_tile.cuh's default: GROUP): the query heads of a kv head's group that one
// tile holds; a large group is cut into NHC chunks of HCH heads, each its own tile, so that a
// tile holds several query tokens instead of one token and padding
static_assert(HCH >= 1 && HCH <= GROUP, "a tile holds 1 to GROUP heads of a token");
constexpr int NHC = (GROUP + HCH - 1) / HCH;  // head chunks a kv head (grid y / items: kv head * NHC + chunk)
constexpr int QT = BM / HCH;       // query tokens per tile
constexpr int QR = QT * HCH;       // rows that hold a query head (HCH not dividing BM: the rest pad)
// Row r's query token in the tile and its head in the chunk (a tile of one token: no division)
__device__ __forceinline__ int row_tok(int r) { return QT == 1 ? 0 : r / HCH; }
__device__ __forceinline__ int row_head(int r) { return QT == 1 ? r : r % HCH; }

// One work item: the query tile of sequence ``b`` from query ``j0``, head chunk ``hc`` (kv head
// hc / NHC, its query heads from (hc % NHC) * HCH); what its producer and its consumers both
// derive from the step's tables.
struct Item {
    int h, hq0, nh, j0, qlen, qpos0, first_pos, last_pos, kv_end, first_vis, t_begin, num_tiles, own, win_edge;
    long long qrow0;
    const int* table;
};
__device__ __forceinline__ Item prefill_item(int b, int j0, int hc,
                                             const int* __restrict__ seq_lens, const int* __restrict__ query_lens,
                                             const int* __restrict__ q_start, const int* __restrict__ own_start,
                                             const int* __restrict__ block_tables, int max_blocks, int window) {
    Item it;
    it.h = hc / NHC;                           // the kv head
    const int c0 = (hc % NHC) * HCH;           // the chunk's first head in the group
    it.hq0 = it.h * GROUP + c0;                // its first query head
    it.nh = min(HCH, GROUP - c0);              // its heads (fewer in a group's last chunk)
    it.j0 = j0;
    const int seq_len = seq_lens[b];
    it.qlen = query_lens[b];
    it.qpos0 = seq_len - it.qlen;              // position of query token 0
    it.qrow0 = q_start[b];
    const int last_tok = min(it.j0 + QT, it.qlen) - 1;
    it.kv_end = it.qpos0 + last_tok + 1;       // K/V positions this tile can see
    it.num_tiles = (it.kv_end + BN - 1) / BN;
    it.first_pos = it.qpos0 + it.j0;
    it.last_pos = it.qpos0 + last_tok;
    it.own = own_start != nullptr ? own_start[b] : 0;
    it.first_vis = max(it.own, window > 0 ? max(0, it.first_pos - window + 1) : 0);
    it.t_begin = it.first_vis / BN;
    it.win_edge = window > 0 ? it.last_pos - window : -1;
    it.table = block_tables + (long long)b * max_blocks;
    return it;
}

// The item's Q tile -> shared memory (rows past the sequence's queries zero-filled), copied
// by ``n`` threads of which this is number ``me``.
__device__ __forceinline__ void load_q(const WgSmem& sm, const kv_t* __restrict__ q, const Item& it,
                                       int num_q_heads, int me, int n) {
    for (int c = me; c < BM * CPR; c += n) {
        const int r = c / CPR, ch = c % CPR;
        const int tok = it.j0 + row_tok(r);
        const bool ok = r < QR && row_head(r) < it.nh && tok < it.qlen;
        const kv_t* src = ok ? q + ((it.qrow0 + tok) * num_q_heads + it.hq0 + row_head(r)) * D + ch * 8 : q;
        cp_async16(sm.q + sw128_offset(BM, r, ch), src, ok);
    }
}

extern "C" __global__ void __launch_bounds__(NT, 1) paged_prefill_sm90(
    const kv_t* __restrict__ q,             // [total_query_tokens, num_q_heads, HEAD_DIM]
    const st_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ seq_lens,       // [num_seqs]
    const int* __restrict__ query_lens,     // [num_seqs]
    const int* __restrict__ q_start,        // [num_seqs]: first row of each sequence in q / out
    const int* __restrict__ tiles,          // [num_tiles, 2]: (sequence, first query token); PERSIST:
                                            // [num_work, 3]: (sequence, first query token, kv head * NHC + chunk)
    kv_t* __restrict__ out,                 // [total_query_tokens, num_q_heads, HEAD_DIM] (parts == 0)
    int layer, int num_layers, int num_kv_heads, int max_blocks,
    const int* __restrict__ own_start,      // [num_seqs] or null: the first position read
    float* __restrict__ part_o,             // [total_query_tokens, num_q_heads, parts, HEAD_DIM]
    float* __restrict__ part_lse,           // [total_query_tokens, num_q_heads, parts]
    int parts,
    const float* __restrict__ kv_scales,    // unused (16-bit pools only; the signature is paged_prefill's)
    const void* __restrict__ kv_map,        // TMA: the pool's tensor map (cupy_tma.py), else unused
    int num_work,                           // PERSIST: work items (num_tiles * num_kv_heads * NHC), else unused
    int* __restrict__ work_counter,         // PERSIST: 2 ints, 0 before the launch and after it, else unused
    int window, float softcap, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const WgSmem sm = wg_smem(smem_raw);  // the Q tile, the K and V stages (SW128)

    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, wwarp = (tid >> 5) & 3;   // warpgroup, warp within it
    const int gid = lane >> 2, tig = lane & 3;
    const int num_q_heads = num_kv_heads * GROUP;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * D;
    auto item = [&](int b, int j0, int h) -> Item {
        return prefill_item(b, j0, h, seq_lens, query_lens, q_start, own_start, block_tables, max_blocks, window);
    };
    auto k_off_of = [&](int h) -> long long { return ((long long)layer * 2 * num_kv_heads + h) * BLOCK_SIZE * D; };
    const long long v_step = (long long)num_kv_heads * BLOCK_SIZE * D;  // V's rows after K's

#if PERSIST
    auto load = [&](int, int, int, int) -> bool { return false; };  // the producer copies (wg_produce)
#else
    // Grid: x = query tile, y = kv head * NHC + head chunk: one item a CTA.
    const Item it0 = item(tiles[2 * blockIdx.x], tiles[2 * blockIdx.x + 1], blockIdx.y);
    const long long k_off0 = k_off_of(it0.h);
    // K/V tile t -> stage: the visible positions [first_vis, kv_end) (TMA where a tile is all
    // visible; else cp.async, the rest zero-filled).
    auto load = [&](int t, int stage, int me, int n) -> bool {
        return wg_load_tile(sm, stage, pool, kv_map, it0.table, block_stride, k_off0, k_off0 + v_step, t,
                            it0.first_vis, it0.kv_end, me, n);
    };
#endif
    // The consumers' work on one item whose Q tile is in shared memory, its K/V tiles coming
    // as the CTA's tiles base, base + 1, ... (without the producer, ``load`` copies them).
    auto attend = [&](const Item& it, int base) {
        float o[D / 2], m[2], l[2];  // m64nD accumulator (kvpager_wgmma_tile.cuh's layout), row max and sum
        wg_init(o, m, l);
        int p[2];         // query position of this thread's two rows (-1: padding row)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wg * 64 + wwarp * 16 + gid + 8 * hf;
            p[hf] = r < QR && row_head(r) < it.nh && it.j0 + row_tok(r) < it.qlen ? it.qpos0 + it.j0 + row_tok(r) : -1;
        }
        // Causal and padding mask, only on tiles that reach past the tile's first query;
        // the own part's start and the window's edge, only on the tiles that hold them.
        auto mask = [&](float* s, int t) {
            if ((t + 1) * BN - 1 > it.first_pos) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kp = t * BN + n * 8 + tig * 2 + e;
                        if (kp > p[0]) s[4 * n + e] = NEG_INF;
                        if (kp > p[1]) s[4 * n + 2 + e] = NEG_INF;
                    }
            }
            if (t * BN < it.own) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kp = t * BN + n * 8 + tig * 2 + e;
                        if (kp < it.own) { s[4 * n + e] = NEG_INF; s[4 * n + 2 + e] = NEG_INF; }
                    }
            }
            if (t * BN <= it.win_edge) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kp = t * BN + n * 8 + tig * 2 + e;
                        if (kp <= p[0] - window) s[4 * n + e] = NEG_INF;
                        if (kp <= p[1] - window) s[4 * n + 2 + e] = NEG_INF;
                    }
            }
        };
        // This warpgroup's 64 Q rows: K-major A operand, SBO 1024 (8-row groups).
        wg_attend(o, m, l, sm.q_addr + wg * 64 * 128, sm.k_addr, sm.v_addr, it.t_begin, it.num_tiles, softcap,
                  scale_log2, load, mask, tid, base);

#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float lt = wg_row_sum(l[hf]);
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            if (p[hf] < 0) continue;
            const int r = wg * 64 + wwarp * 16 + gid + 8 * hf;
            const long long orow = (it.qrow0 + it.j0 + row_tok(r)) * num_q_heads + it.hq0 + row_head(r);
            if (parts > 0) {  // a cascade's own part: slot 0, the segments' slots empty until filled
                wg_store_f32(part_o + orow * parts * D, o, hf, inv, tig);
                if (tig == 0) {
                    part_lse[orow * parts] = lt > 0.f ? m[hf] * scale_log2 + __log2f(lt) : NEG_INF;
                    for (int sl = 1; sl < parts; ++sl) part_lse[orow * parts + sl] = NEG_INF;
                }
                continue;
            }
            unsigned* dst = reinterpret_cast<unsigned*>(out + orow * D);
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                dst[n * 4 + tig] = pack2(o[4 * n + 2 * hf] * inv, o[4 * n + 2 * hf + 1] * inv);
        }
    };

#if PERSIST
    // Work item w: row w of the tiles list, here (sequence, first query, kv head): the items
    // of one K/V stream (a sequence's kv head) side by side, so that the CTAs running at once
    // read few streams (each from L2 once). CTA c starts with item c; each next item comes from
    // the counter (work_counter[0] + gridDim.x), taken when the CTA starts its item before:
    // CTAs that run late (SMs busy with other work) take fewer items instead of holding a
    // fixed share back. The producer copies each item's Q tile (once both MMA warpgroups
    // issued their last S on the one before) and K/V tiles through the stages without a pause
    // between items, so the next item's copies run under this one's last tiles and its output;
    // its thread 0 hands the item's number to the MMA warpgroups with the Q tile (an arrival
    // on q_full after the number is stored; -1: none left). The CTA that finishes last sets
    // both counters back to 0 for the next launch.
    const unsigned q_full = smem_addr(&wg_barriers()[2 * STAGES]), q_empty = q_full + 8;
    __shared__ int handed, fetched[2];
    wg_barriers_init(tid);
    if (tid >= NC) {  // the producer warpgroup
        setmaxnreg_dec<PRODUCER_REGS>();
        const int me = tid - NC;
        int g = 0, n = 0;
        for (int w = blockIdx.x;; ++n) {
            // the next item, asked for now and stored once this one's copies are issued (the
            // atomic's round trip is not waited for here)
            const int next = me == 0 && w < num_work ? atomicAdd(work_counter, 1) + (int)gridDim.x : 0;
            if (n > 0) mbar_wait(q_empty, (n - 1) & 1);
            if (w >= num_work) {  // none left: the MMA warpgroups are told so, and the producer is done
                if (me == 0) handed = -1;
                mbar_arrive(q_full);
                if (me == 0) mbar_arrive(q_full);
                break;
            }
            const Item it = item(tiles[3 * w], tiles[3 * w + 1], tiles[3 * w + 2]);
            load_q(sm, q, it, num_q_heads, me, NT - NC);
            cp_async_mbar_arrive(q_full);
            if (me == 0) {
                handed = w;
                mbar_arrive(q_full);  // after the store (release): the MMA warpgroups read it after their wait
            }
            const long long k_off = k_off_of(it.h);
            auto copy = [&](int t, int stage, int who, int count) -> bool {
                return wg_load_tile(sm, stage, pool, kv_map, it.table, block_stride, k_off, k_off + v_step, t,
                                    it.first_vis, it.kv_end, who, count);
            };
            wg_produce(copy, me, it.t_begin, it.num_tiles, g);
            if (me == 0) fetched[n & 1] = next;
            named_barrier_sync(4, NT - NC);  // two slots: one is read while the next is stored
            w = fetched[n & 1];
        }
        cp_commit();
        cp_wait<0>();  // every copy of this thread landed before it leaves
        return;
    }
    setmaxnreg_inc<CONSUMER_REGS>();
    int g = 0;
    for (int n = 0;; ++n) {
        mbar_wait(q_full, n & 1);
        const int w = handed;  // stored before the arrival that completed the phase; rewritten only after q_empty
        if (w < 0) break;
        const Item it = item(tiles[3 * w], tiles[3 * w + 1], tiles[3 * w + 2]);
        fence_proxy_async();  // the producer's Q copies (generic proxy) -> visible to wgmma
        if (it.t_begin >= it.num_tiles) mbar_arrive(q_empty);  // no K/V tile: Q is not read
        attend(it, g);
        g += max(0, it.num_tiles - it.t_begin);
    }
    named_barrier_sync(1, NC);
    if (tid == 0) {  // every item of this CTA is done, its counter fetches too
        __threadfence();
        if (atomicAdd(work_counter + 1, 1) == gridDim.x - 1) {
            work_counter[0] = 0;  // the last CTA: nobody fetches any more in this launch
            work_counter[1] = 0;
        }
    }
#else
    if (tid < NC) load_q(sm, q, it0, num_q_heads, tid, NC);  // Q tile -> smem, by the consumer threads
    if (wg_start(load, tid, it0.t_begin, it0.num_tiles)) return;     // the producer's work is done
    attend(it0, 0);
#endif
}
