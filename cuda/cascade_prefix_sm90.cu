// cascade_prefix_sm90.cu: the shared part of shared-prefix (cascade) attention on
// Hopper's warpgroup MMA (wgmma, sm_90a only), float16 / bfloat16 pools, float32
// accumulate. Same signature, tables and results as cascade_prefix.cu (read its
// header: segments, members as query rows, tiles with segment -1 for unused
// ones, the float32 partial state of each member row in slot ``slot``, merged
// later by merge_splits.cu); FP8 pools and other head dims use cascade_prefix.cu.
//
// A CTA owns BM = 64 * WG rows: row r is (member row j0 + r / GROUP, query head
// kv_head * GROUP + r % GROUP), one warpgroup per 64 rows, and walks the
// segment's K/V positions [kv_start, kv_end) of its table row in tiles of BN
// positions, as paged_prefill_sm90.cu walks a query tile's: the same gather
// into the 128-byte-swizzled layout, S = Q K^T and O += P V on wgmma, online
// softmax, and the same pipelines (all threads copying STAGES deep; OVERLAP;
// WS: a producer warpgroup with mbarriers, whose tiles inside the segment come by TMA
// with TMA=1), all kvpager_wgmma_tile.cuh's. Every
// position of a segment precedes every member query: no causal mask, only the
// positions outside the segment (in its first and last tiles) are masked; soft
// cap as in the mma kernel; no window (the planner does not cascade a windowed call).
//
// Grid: x = query tile (tiles list), y = kv head; NT = 128 * WG threads (+ 128
// with WS). Dynamic shared memory: (BM + 2 * STAGES * BN) * HEAD_DIM * 2 + 1024
// bytes, as paged_prefill_sm90.cu's.
#include "kvpager_common.cuh"
#include "kvpager_mma.cuh"
#include "kvpager_wgmma.cuh"
#include "kvpager_cascade.cuh"

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
#error "cascade_prefix_sm90.cu is for float16 / bfloat16 pools; FP8 pools use cascade_prefix.cu"
#endif
// kvpager_wgmma_tile.cuh: the knobs (WG, BN, STAGES, VN, OVERLAP, WS), constants and shared steps
#include "kvpager_wgmma_tile.cuh"
static_assert(HCH == GROUP && GROUP <= BM, "a tile holds whole members (no head chunks)");
constexpr int QR = BM / GROUP * GROUP;  // rows that hold a query head (a group not dividing BM: the rest pad)

extern "C" __global__ void __launch_bounds__(NT, 1) cascade_prefix_sm90(
    const kv_t* __restrict__ q,             // [num_items, num_q_heads, HEAD_DIM]
    const st_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_rows, max_blocks]
    const int* __restrict__ segments,       // [num_segments, 6]
    const int* __restrict__ members,        // [total member rows]: rows of q
    const int* __restrict__ tiles,          // [num_tiles, 2]: (segment, first member)
    float* __restrict__ part_o,             // [num_items, num_q_heads, parts, HEAD_DIM]
    float* __restrict__ part_lse,           // [num_items, num_q_heads, parts]
    int layer, int num_layers, int num_kv_heads, int max_blocks, int parts,
    const float* __restrict__ kv_scales,    // unused (16-bit pools only; the signature is cascade_prefix's)
    const void* __restrict__ kv_map,        // TMA: the pool's tensor map (cupy_tma.py), else unused
    float softcap, float scale_log2)
{
    CascadeTile ct;
    if (!cascade_tile(blockIdx.x, tiles, segments, members, block_tables, max_blocks, ct)) return;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const WgSmem sm = wg_smem(smem_raw);  // the Q tile, the K and V stages (SW128)

    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, wwarp = (tid >> 5) & 3;   // warpgroup, warp within it
    const int gid = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;
    const int kv_start = ct.kv_start, kv_end = ct.kv_end;
    const int t_begin = kv_start / BN;
    const int num_tiles = (kv_end + BN - 1) / BN;
    const PoolHead ph = pool_head(layer, num_layers, num_kv_heads, h, BLOCK_SIZE * D);

    // Q tile -> smem: each member's query row (rows past the segment's members zero-filled),
    // by the consumer threads.
    if (tid < NC) for (int c = tid; c < BM * CPR; c += NC) {
        const int r = c / CPR, ch = c % CPR;
        const int mb = ct.j0 + r / GROUP;
        const bool ok = r < QR && mb < ct.count;
        const kv_t* src = ok ? q + cascade_row(ct, mb, num_q_heads, h * GROUP + r % GROUP) * D + ch * 8 : q;
        cp_async16(sm.q + sw128_offset(BM, r, ch), src, ok);
    }
    // K/V tile t -> stage: the segment's positions (TMA where a tile is all in the segment;
    // else cp.async, the rest zero-filled).
    auto load = [&](int t, int stage, int me, int n) -> bool {
        return wg_load_tile(sm, stage, pool, kv_map, ct.table, ph.block_stride, ph.k_off, ph.v_off, t, kv_start,
                            kv_end, me, n);
    };
    if (wg_start(load, tid, t_begin, num_tiles)) return;  // the producer's work is done

    float o[D / 2], m[2], l[2];  // m64nD accumulator (kvpager_wgmma_tile.cuh's layout), row max and sum
    wg_init(o, m, l);
    // Positions outside the segment: only in its first and last tiles.
    auto mask = [&](float* s, int t) {
        if (t * BN < kv_start || (t + 1) * BN > kv_end) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = t * BN + n * 8 + tig * 2 + e;
                    if (kp < kv_start || kp >= kv_end) { s[4 * n + e] = NEG_INF; s[4 * n + 2 + e] = NEG_INF; }
                }
        }
    };
    wg_attend(o, m, l, sm.q_addr + wg * 64 * 128, sm.k_addr, sm.v_addr, t_begin, num_tiles, softcap, scale_log2, load,
              mask, tid);

    // The partial state of each member row: output normalised within the segment, log2-sum-exp.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const float lt = wg_row_sum(l[hf]);
        const int r = wg * 64 + wwarp * 16 + gid + 8 * hf;
        const int mb = ct.j0 + r / GROUP;
        if (r >= QR || mb >= ct.count) continue;
        const long long prow = cascade_row(ct, mb, num_q_heads, h * GROUP + r % GROUP) * parts + ct.slot;
        wg_store_f32(part_o + prow * D, o, hf, lt > 0.f ? 1.f / lt : 0.f, tig);
        if (tig == 0) part_lse[prow] = lt > 0.f ? m[hf] * scale_log2 + __log2f(lt) : NEG_INF;
    }
}
