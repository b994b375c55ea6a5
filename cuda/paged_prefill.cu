// paged_prefill.cu: multi-token paged attention (prefill, chunked prefill on
// top of a cached prefix), causal, float16 / bfloat16 on tensor cores
// (mma.sync m16n8k16, float32 accumulate).
//
// Query token j of sequence b sits at position seq_len - query_len + j and
// sees K/V positions <= its own. A CTA owns one query tile of BM = 64 * MT
// rows, where row r is (query token j0 + r / HCH, query head kv_head * GROUP
// + chunk * HCH + r % HCH): all heads of a GQA group share the tile (HCH =
// GROUP), so each K/V tile is loaded once for them, or a large group is cut
// into NHC chunks of HCH heads, a tile each (grid y: kv head * NHC + chunk), so
// that a tile holds several query tokens rather than one and padding. The 4 warps own 16 * MT rows each (MT m-tiles, so
// every K/V fragment read from shared memory feeds MT MMAs) and walk the
// sequence's K/V in tiles of BN tokens, staged in shared memory by cp.async
// (16 bytes, STAGES deep, rows past the end zero-filled) and read with
// ldmatrix; S = Q K^T and O += P V run on mma.sync with an online softmax
// (exp2) in registers between them. Only the tiles that cross the diagonal
// apply the causal mask.
//
// window > 0 (sliding window): query position p sees only K/V positions
// (p - window, p]; the K/V tiles before the tile's first visible position are
// not read, and the tiles that reach below a row's window mask it. softcap > 0:
// raw scores s (q . k) become softcap * tanh(s / softcap), so the host passes
// the cap divided by the scale.
//
// own_start (optional; a cascade, see cascade_prefix.cu): sequence b reads only
// its own positions [own_start[b], seq_len), after the shared segments, which
// precede all its queries; with parts > 0 each row writes a partial state (the
// float32 output normalised over those positions, times the V scale, and its
// log2-sum-exp) into slot 0 of its ``parts`` and marks the other slots empty
// (cascade_prefix, launched next, fills its member rows'), for merge_splits
// (paged_decode.cu); parts == 0: the output in the compute type.
//
// Grid: x = query tile (from the tiles list built by the planner), y = kv head * NHC + head chunk.
// Dynamic shared memory: (BM + 2 * STAGES * BN) * (HEAD_DIM + 8) * 2 bytes
// (rows padded by 16 bytes so ldmatrix rows fall in different banks).
//
// Heads wider than 256 (Gemma-4's 512; DSPLIT = 2): a row's 16 * MT rows of O
// are too many registers for one warp, so two warps share them, each the MMAs
// of half the head dim (DP / 2 columns, DP the head dim rounded up to 32, the
// pad columns of every tile zero), with 8 warps a CTA. S = Q K^T comes as two
// partial sums, one a warp over its half of q . k: each warp writes its own
// into shared memory and adds its partner's (the same float sum in both), so
// both hold the whole S and run the same softmax; each then adds P V of its
// half of V's columns. Dynamic shared memory: (BM + 2 * STAGES * BN) * (DP + 8)
// * 2 bytes and the partial scores, 8 * MT * BN * 64 bytes. No FP8 (refused at
// pool creation for such heads).
//
// KV_FP8 (an FP8 pool): cp.async stages the FP8 bytes as stored (STAGES deep, rows
// of HEAD_DIM bytes); each iteration the CTA converts its tile (exactly) into one
// K and one V tile of the compute type, from which the MMAs read as above. Scores
// are multiplied by the (layer, head) K scale before the soft cap, the output by
// the V scale. The MMAs take float16 operands (kvpager_common.cuh): a bfloat16 Q tile is
// converted in shared memory once, times a power of two that fits it into float16's range,
// undone with the K scale. Dynamic shared memory: (BM + 2 * BN) * (HEAD_DIM + 8) * 2
// + 2 * STAGES * BN * HEAD_DIM bytes.
#include "kvpager_common.cuh"
#include "kvpager_mma.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef GROUP
#define GROUP 4
#endif
#ifndef HCH
#define HCH GROUP  // query heads of the group a tile holds
#endif
#ifndef MT
#define MT (HEAD_DIM > 128 ? 1 : 2)  // m-tiles (16 rows) per warp
#endif
#ifndef STAGES
#define STAGES (MT == 2 ? 3 : 2)
#endif

#if KV_DTYPE == 2
#error "paged_prefill.cu is for float16 / bfloat16; float32 uses paged_decode.cu per query token"
#endif

constexpr int HD = HEAD_DIM;                 // the pool's head dim: rows of q, K, V and out
constexpr int DSPLIT = HD > 256 ? 2 : 1;    // warps that share a row, each its part of the head dim
constexpr int DP = (HD + 16 * DSPLIT - 1) / (16 * DSPLIT) * (16 * DSPLIT);  // padded: whole k-steps a part
constexpr int D = DP / DSPLIT;              // the head dims one warp's MMAs cover (kvpager_tile.cuh's D)
constexpr int BM = 64 * MT;
constexpr int BN = (MT == 2 || D > 128) ? 32 : 64;
constexpr int LD = DP + 8;          // padded smem row, in elements
constexpr int NHC = (GROUP + HCH - 1) / HCH;  // head chunks a kv head
constexpr int QT = BM / HCH;        // query tokens per tile
constexpr int QR = QT * HCH;        // rows that hold a query head (HCH not dividing BM: the rest pad)
constexpr int NT = 128 * DSPLIT;
constexpr int WR = 16 * MT;         // rows per warp
#include "kvpager_tile.cuh"
static_assert(HCH >= 1 && HCH <= GROUP && HCH <= BM, "a tile holds 1 to min(GROUP, BM) heads of a token");
static_assert(MT == 1 || D <= 128, "two m-tiles per warp only up to head dim 128 (registers)");
static_assert(DSPLIT == 1 || !KV_FP8, "FP8 pools of heads wider than 256 are not built");

extern "C" __global__ void __launch_bounds__(NT) paged_prefill(
    const kv_t* __restrict__ q,             // [total_query_tokens, num_q_heads, HEAD_DIM]
    const st_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ seq_lens,       // [num_seqs]
    const int* __restrict__ query_lens,     // [num_seqs]
    const int* __restrict__ q_start,        // [num_seqs]: first row of each sequence in q / out
    const int* __restrict__ tiles,          // [num_tiles, 2]: (sequence, first query token)
    kv_t* __restrict__ out,                 // [total_query_tokens, num_q_heads, HEAD_DIM] (parts == 0)
    int layer, int num_layers, int num_kv_heads, int max_blocks,
    const int* __restrict__ own_start,      // [num_seqs] or null: the first position read
    float* __restrict__ part_o,             // [total_query_tokens, num_q_heads, parts, HEAD_DIM]
    float* __restrict__ part_lse,           // [total_query_tokens, num_q_heads, parts]
    int parts,
    const float* __restrict__ kv_scales,    // [num_layers, 2, num_kv_heads] (KV_FP8; else unused)
    const void* __restrict__ kv_map,        // unused (paged_prefill_sm90.cu's TMA tensor map)
    int window, float softcap, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const TileSmem sm = tile_smem(smem_raw);
    // DSPLIT > 1: each warp's partial scores, [warps][MT][BN / 2][32 lanes] (after the stages)
    float* Xs = reinterpret_cast<float*>(smem_raw + (BM + 2 * STAGES * BN) * LD * sizeof(kv_t));

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int rw = warp / DSPLIT, part = warp % DSPLIT;  // the warp's rows, and its part of the head dim
    const int b = tiles[2 * blockIdx.x], j0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y / NHC;                        // the kv head
    const int c0 = (blockIdx.y % NHC) * HCH;               // the chunk's first head in the group
    const int hq0 = h * GROUP + c0, nh = min(HCH, GROUP - c0);  // its first query head, its heads
    const int num_q_heads = num_kv_heads * GROUP;
    const int seq_len = seq_lens[b], qlen = query_lens[b];
    const int qpos0 = seq_len - qlen;          // position of query token 0
    const long long qrow0 = q_start[b];
    const int last_tok = min(j0 + QT, qlen) - 1;
    const int kv_end = qpos0 + last_tok + 1;   // K/V positions this tile can see
    const int num_tiles = (kv_end + BN - 1) / BN;
    const int first_pos = qpos0 + j0;          // smallest query position of the tile
    const int last_pos = qpos0 + last_tok;     // largest
    // The first K/V tile any row of this tile sees, and below which position a row may not see.
    const int own = own_start != nullptr ? own_start[b] : 0;  // before it: the shared segments
    const int first_vis = max(own, window > 0 ? max(0, first_pos - window + 1) : 0);
    const int t_begin = first_vis / BN;
    const int win_edge = window > 0 ? last_pos - window : -1;

    const int* table = block_tables + (long long)b * max_blocks;
    const PoolHead ph = pool_head(layer, num_layers, num_kv_heads, h, BLOCK_SIZE * HD);
    constexpr int CPR = HD / 8;  // 16-byte chunks per row of q

    if constexpr (DP > HD) {  // the pad columns of the Q tile and every stage: zero (no load writes them)
        constexpr int PC = DP > HD ? (DP - HD) / 8 : 1;  // (1: this branch is not taken)
        for (int c = tid; c < (BM + 2 * STAGES * BN) * PC; c += NT)
            *reinterpret_cast<uint4*>(sm.q + (c / PC) * LD + HD + (c % PC) * 8) = make_uint4(0, 0, 0, 0);
    }

    // Q tile -> smem (rows past the sequence's queries zero-filled).
    for (int c = tid; c < BM * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int tok = j0 + r / HCH;
        const bool ok = r < QR && r % HCH < nh && tok < qlen;
        const kv_t* src = ok ? q + ((qrow0 + tok) * num_q_heads + hq0 + r % HCH) * HD + col : q;
        cp_async16(sm.q + r * LD + col, src, ok);
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < num_tiles) tile_load_kv(sm, s, pool, table, ph, t_begin + s, first_vis, kv_end, tid);
        cp_commit();  // the first group also holds the Q tile
    }

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
    int p[MT][2];  // query position of this thread's rows (-1: padding row, sees nothing)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            m[mt][hf] = NEG_INF;
            l[mt][hf] = 0.f;
            const int r = rw * WR + mt * 16 + gid + 8 * hf;
            p[mt][hf] = r < QR && r % HCH < nh && j0 + r / HCH < qlen ? qpos0 + j0 + r / HCH : -1;
        }
    }

    const float2 scales = tile_scales(kv_scales, layer, num_kv_heads, h, tid);
    float k_scale = scales.x;
    int st = 0, ist = STAGES - 1;
    for (int t = t_begin; t < num_tiles; ++t) {
        if (t + STAGES - 1 < num_tiles) tile_load_kv(sm, ist, pool, table, ph, t + STAGES - 1, first_vis, kv_end, tid);
        cp_commit();
        cp_wait<STAGES - 1>();
        __syncthreads();
        const kv_t *ks, *vs;
        tile_stage(sm, st, t == t_begin, k_scale, tid, ks, vs);
        float s[MT][BN / 8][4];
        if constexpr (DSPLIT == 1) {
            tile_scores(s, sm.q, ks, rw, lane, k_scale, softcap);
        } else {  // this warp's part of q . k, then its partner's added: the whole S in both
            tile_scores(s, sm.q + part * D, ks + part * D, rw, lane, k_scale, 0.f);
            float* mine = Xs + warp * (MT * BN / 2) * 32 + lane;
            const float* theirs = Xs + (warp ^ 1) * (MT * BN / 2) * 32 + lane;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) mine[((mt * BN / 8 + n) * 4 + e) * 32] = s[mt][n][e];
            __syncthreads();  // (the last reads of Xs were before the previous iteration's barrier)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][n][e] += theirs[((mt * BN / 8 + n) * 4 + e) * 32];
            tile_softcap(s, softcap);
        }
        // Causal and padding mask, only on tiles that reach past the tile's first query;
        // the window's, only on tiles that reach below the last query's window.
        if ((t + 1) * BN - 1 > first_pos) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kp = t * BN + n * 8 + tig * 2 + e;
                        if (kp > p[mt][0]) s[mt][n][e] = NEG_INF;
                        if (kp > p[mt][1]) s[mt][n][2 + e] = NEG_INF;
                    }
        }
        tile_mask_outside(s, t, own, 0x7fffffff, lane);  // the own part's first tile (blocks can be shorter than BN)
        if (t * BN <= win_edge) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kp = t * BN + n * 8 + tig * 2 + e;
                        if (kp <= p[mt][0] - window) s[mt][n][e] = NEG_INF;
                        if (kp <= p[mt][1] - window) s[mt][n][2 + e] = NEG_INF;
                    }
        }
        tile_softmax_pv(s, o, m, l, vs + part * D, scale_log2, lane);
        __syncthreads();  // this stage is refilled STAGES - 1 iterations later
        st = st + 1 == STAGES ? 0 : st + 1;
        ist = ist + 1 == STAGES ? 0 : ist + 1;
    }
    cp_wait<0>();

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float lt = l[mt][hf];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const float inv = lt > 0.f ? scales.y / lt : 0.f;
            if (p[mt][hf] < 0) continue;
            const int r = rw * WR + mt * 16 + gid + 8 * hf;
            const long long orow = (qrow0 + j0 + r / HCH) * num_q_heads + hq0 + r % HCH;
            constexpr int NO = (HD - (DSPLIT - 1) * D) / 8;  // the last part's n-tiles within the head dim
            const int nout = part == DSPLIT - 1 ? NO : D / 8;
            if (parts > 0) {  // a cascade's own part: slot 0, the segments' slots empty until filled
                float2* dst = reinterpret_cast<float2*>(part_o + orow * parts * HD + part * D) + tig;
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    if (n < nout) dst[n * 4] = make_float2(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
                if (tig == 0 && part == 0) {
                    part_lse[orow * parts] = lt > 0.f ? m[mt][hf] * scale_log2 + __log2f(lt) : NEG_INF;
                    for (int sl = 1; sl < parts; ++sl) part_lse[orow * parts + sl] = NEG_INF;
                }
                continue;
            }
            unsigned* dst = reinterpret_cast<unsigned*>(out + orow * HD + part * D);
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                if (n < nout) dst[n * 4 + tig] = pack2(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
        }
    }
}
