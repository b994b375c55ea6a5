// cascade_prefix.cu: the shared part of shared-prefix (cascade) attention,
// decode and multi-token steps, float16 / bfloat16 on tensor cores
// (mma.sync m16n8k16, float32 accumulate); FP8 pools too.
//
// The planner finds sequences of a step whose block tables start with the
// same blocks, whole blocks before each sequence's first query token. A
// segment is one such run of K/V positions [kv_start, kv_end) (read through
// one member's table row) and its member query rows: every query token of
// every member sequence (the planner lists their rows of q, member after
// member, token after token; one per member in a decode step). Every query
// head of every such row attends to the segment's positions here, as rows of
// one tensor-core tile per kv head, so each shared K/V tile is read once for
// all of them (instead of once per sequence and query tile). The result is a
// partial attention state, written as a float32 output normalised within the
// segment and its log2-sum-exp into the row's partial slot ``slot``; the
// decode or multi-token kernel writes each sequence's own positions (from the
// end of its deepest segment) into slot 0 (or the split slots), and
// merge_splits (merge_splits.cu) combines them. Every position of a segment
// precedes every member query, so no causal mask applies; sliding windows are
// not applied here (the planner does not cascade a windowed call).
//
// A CTA owns BM = 64 * MT rows: row r is (member row j0 + r / GROUP, query head
// kv_head * GROUP + r % GROUP); its 4 warps walk the segment's K/V in tiles of
// BN positions, staged by cp.async (STAGES deep, positions outside the
// segment zero-filled and masked), S = Q K^T and O += P V on mma.sync with an
// online softmax (exp2) in registers between them, as in paged_prefill.cu.
//
// Grid: x = query tile (tiles list: (segment, first member); segment -1: unused,
// the CTA exits), y = kv head.
// segments: int32 [num_segments, 6] = (table row, kv_start, kv_end, first
// member row in members, member row count, slot). members: the member rows'
// indices in q (query token rows). Dynamic shared memory: (BM + 2 * STAGES * BN)
// * (HEAD_DIM + 8) * 2 bytes.
//
// KV_FP8 (an FP8 pool), as in paged_prefill.cu: cp.async stages the FP8 bytes as
// stored (STAGES deep, rows of HEAD_DIM bytes), each iteration the CTA converts its
// tile (exactly) into one float16 K and one V tile, from which the MMAs read; scores
// are multiplied by the (layer, head) K scale before the soft cap, the output by
// the V scale; a bfloat16 Q tile is converted to float16 in shared memory once,
// times a power of two that fits it into float16's range, undone with the K scale.
// Dynamic shared memory: (BM + 2 * BN) * (HEAD_DIM + 8) * 2 + 2 * STAGES * BN * HEAD_DIM bytes.
#include "kvpager_common.cuh"
#include "kvpager_mma.cuh"
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
#ifndef MT
#define MT (HEAD_DIM > 128 ? 1 : 2)  // m-tiles (16 rows) per warp
#endif
#ifndef STAGES
#define STAGES (MT == 2 ? 3 : 2)
#endif

#if KV_DTYPE == 2
#error "cascade_prefix.cu is for float16 / bfloat16"
#endif

constexpr int HD = HEAD_DIM;
constexpr int D = HEAD_DIM;
constexpr int BM = 64 * MT;
constexpr int BN = (MT == 2 || D > 128) ? 32 : 64;
constexpr int LD = D + 8;           // padded smem row, in elements
constexpr int NT = 128;
constexpr int WR = 16 * MT;         // rows per warp
constexpr int CPR = D / 8;          // 16-byte chunks per row
#include "kvpager_tile.cuh"
static_assert(MT == 1 || D <= 128, "two m-tiles per warp only up to head dim 128 (registers)");
static_assert(GROUP <= BM, "a tile holds at least one member");
constexpr int QR = BM / GROUP * GROUP;  // rows that hold a query head (a group not dividing BM: the rest pad)

extern "C" __global__ void __launch_bounds__(NT) cascade_prefix(
    const kv_t* __restrict__ q,             // [num_items, num_q_heads, HEAD_DIM]
    const st_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_rows, max_blocks]
    const int* __restrict__ segments,       // [num_segments, 6]
    const int* __restrict__ members,        // [total member rows]: rows of q
    const int* __restrict__ tiles,          // [num_tiles, 2]: (segment, first member)
    float* __restrict__ part_o,             // [num_items, num_q_heads, parts, HEAD_DIM]
    float* __restrict__ part_lse,           // [num_items, num_q_heads, parts]
    int layer, int num_layers, int num_kv_heads, int max_blocks, int parts,
    const float* __restrict__ kv_scales,    // [num_layers, 2, num_kv_heads] (KV_FP8; else unused)
    const void* __restrict__ kv_map,        // unused (cascade_prefix_sm90.cu's TMA tensor map)
    float softcap, float scale_log2)
{
    CascadeTile ct;
    if (!cascade_tile(blockIdx.x, tiles, segments, members, block_tables, max_blocks, ct)) return;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const TileSmem sm = tile_smem(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;
    const int t_begin = ct.kv_start / BN;
    const int num_tiles = (ct.kv_end + BN - 1) / BN;
    const PoolHead ph = pool_head(layer, num_layers, num_kv_heads, h, BLOCK_SIZE * HD);

    // Q tile -> smem: each member's query row (rows past the segment's members zero-filled).
    for (int c = tid; c < BM * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int mb = ct.j0 + r / GROUP;
        const bool ok = r < QR && mb < ct.count;
        const kv_t* src = ok ? q + cascade_row(ct, mb, num_q_heads, h * GROUP + r % GROUP) * D + col : q;
        cp_async16(sm.q + r * LD + col, src, ok);
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < num_tiles)
            tile_load_kv(sm, s, pool, ct.table, ph, t_begin + s, ct.kv_start, ct.kv_end, tid);
        cp_commit();  // the first group also holds the Q tile
    }

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    const float2 scales = tile_scales(kv_scales, layer, num_kv_heads, h, tid);
    float k_scale = scales.x;
    int st = 0, ist = STAGES - 1;
    for (int t = t_begin; t < num_tiles; ++t) {
        if (t + STAGES - 1 < num_tiles)
            tile_load_kv(sm, ist, pool, ct.table, ph, t + STAGES - 1, ct.kv_start, ct.kv_end, tid);
        cp_commit();
        cp_wait<STAGES - 1>();
        __syncthreads();
        const kv_t *ks, *vs;
        tile_stage(sm, st, t == t_begin, k_scale, tid, ks, vs);
        float s[MT][BN / 8][4];
        tile_scores(s, sm.q, ks, warp, lane, k_scale, softcap);
        tile_mask_outside(s, t, ct.kv_start, ct.kv_end, lane);  // only its first and last tiles reach past the segment
        tile_softmax_pv(s, o, m, l, vs, scale_log2, lane);
        __syncthreads();  // this stage is refilled STAGES - 1 iterations later
        st = st + 1 == STAGES ? 0 : st + 1;
        ist = ist + 1 == STAGES ? 0 : ist + 1;
    }
    cp_wait<0>();

    // The partial state of each member row: output normalised within the segment, log2-sum-exp.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float lt = l[mt][hf];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const int r = warp * WR + mt * 16 + gid + 8 * hf;
            const int mb = ct.j0 + r / GROUP;
            if (r >= QR || mb >= ct.count) continue;
            const long long prow = cascade_row(ct, mb, num_q_heads, h * GROUP + r % GROUP) * parts + ct.slot;
            const float inv = lt > 0.f ? scales.y / lt : 0.f;
            float2* dst = reinterpret_cast<float2*>(part_o + prow * D) + tig;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                dst[n * 4] = make_float2(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
            if (tig == 0) part_lse[prow] = lt > 0.f ? m[mt][hf] * scale_log2 + __log2f(lt) : NEG_INF;
        }
    }
}
