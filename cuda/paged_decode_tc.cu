// paged_decode_tc.cu: decode attention (one query token per work item) for
// float16 / bfloat16 on tensor cores, over the block-major pool, with
// split-K over long contexts. float32 pools use paged_decode.cu.
//
// Heads wider than 256 (Gemma-4's 512; DSPLIT = 2): a warp's O of the full
// head dim would take 256 accumulators a lane, so two warps share each tile,
// each reading, multiplying and accumulating its half of the head dim (DP / 2
// columns of every K and V row, DP the head dim rounded up to 32; columns past
// the head dim zero-filled), each with its own stages. Their partial scores
// (q . k over a half) are summed through shared memory (a double buffer, and
// a named barrier for the pair per tile): both warps then hold the whole S,
// run the same softmax and add P V of their own half of V's columns. In what
// follows a "warp" of the layout (HPC, WPH) is such a pair; the CTA runs
// HPC * WPH * DSPLIT warps. No FP8 (refused at pool creation for such heads).
//
// Work item i has query row i (q[i]), reads the K/V of sequence item_seq[i]
// up to item_len[i] tokens, and attends with every query head of its kv
// head's GQA group. The group (any count up to 16 heads) is the M dimension of
// mma.sync m16n8k16 (rows past the group are zero); a larger group (Falcon-7B's 71
// heads over one kv head, StarCoder's 48) is cut into QCH chunks of 16 (GS, below):
// S = Q K^T and O += P V for 16 tokens are 2 * HEAD_DIM / 16 MMAs each, so the K/V
// bytes, read once, are the whole cost.
//
// GS (QCH > 1, heads up to 256): one CTA a kv head runs its QCH chunks, WPH warps each
// (QCH * WPH <= 16); the QCH warps of a place wi take the same tiles, copy each into one
// stage set of the place together (a named barrier 1 + wi a tile, after which the stage of
// the tile before is refilled), and each multiplies its chunk's 16 heads by it: the K/V is
// read once for the whole group (five CTAs of 16 heads, each reading it, ran Falcon-7B's
// 71 heads of 64 at 256 x 1,024 in 0.091 ms on an H200). Heads wider than 256: a CTA a
// chunk, reading the K/V each.
//
// Grid: x = (item, chunk of HPC kv heads, chunk of the group where not GS), y = split. A CTA
// (HPC * WPH warps; GS: QCH * WPH) owns one split's token range for HPC kv heads; the WPH warps of a
// head take its 16-token tiles w, w + WPH, w + 2 WPH, ... and each warp runs
// its own STAGES-deep cp.async pipeline (16-byte copies, zero-filled past the
// end) into its private shared-memory stages, read back with ldmatrix, so the
// warps never wait for each other inside the loop. HPC = 1, WPH = 4 for long
// contexts; HPC = 4, WPH = 1 (longer runs of tiles per warp, fewer CTAs) for
// short ones. Q fragments stay in registers; online softmax (exp2, float32)
// between the two products as in the multi-token kernel. At the end the warps merge through shared memory;
// with parts == 0 the CTA writes the normalised output, else a float32
// partial output and its log2-sum-exp into slot ``split`` of ``parts`` for
// merge_splits (merge_splits.cu), or (merge_ctr given: a split decode without
// cascade or sinks) for the last of the item's split CTAs of its kv heads to
// finish, which merges them itself (merge_slots). item_start: the first position each item reads (cascade);
// a cascade's slots past num_splits are left to cascade_prefix and the merge's level mask.
//
// window > 0 (sliding window): the item sees only positions
// [item_len - window, item_len); the splits cover that range from the tile
// boundary below its start (the rows before it are masked). softcap > 0:
// raw scores s (q . k) become softcap * tanh(s / softcap), so the host passes
// the cap divided by the scale.
//
// Shared-memory stages whose rows are whole 128-byte lines (SW: 16-bit pools of head dims
// 64, 128, ..., FP8 pools of 128, 256): rows unpadded in the 128-byte XOR swizzle (a row's
// 16-byte chunk c of each 128-byte region at chunk c ^ (row % 8)), so ldmatrix's 8 rows
// fall in different banks and a warp's copies
// fill whole 128-byte lines (rows padded by 16 bytes instead read 5% slower: a decode of
// 64 x 4,096 on an H200, copies alone 4.27 against 4.50 TB/s). Other 16-bit head dims: rows
// of HEAD_DIM + 8 elements. Dynamic shared memory: HPC * WPH * STAGES * 2 * 16 * row
// bytes (SW: + 128 to align the stages to 128 bytes), and at least
// HPC * WPH * min(GROUP, 16) * HEAD_DIM * 4 for the final merge.
//
// KV_FP8 (an FP8 pool): the stages hold the FP8 bytes as stored (16 per cp.async,
// half the bytes of a 16-bit pool), rows of HEAD_DIM bytes swizzled as above, or (head
// dims not a multiple of 128) padded to an odd number of 16-byte chunks; ldmatrix reads them as 16-bit pairs and each pair is converted to
// float16 in registers right before its MMA (exact; see kvpager_mma.cuh for the
// permuted k order of Q K^T and the even / odd dims of P V). The scores are multiplied by
// the (layer, head) K scale before the soft cap, the output by the V scale. The MMAs take
// float16 operands (kvpager_common.cuh): a bfloat16 q is scaled into float16's range by a
// power of two per warp, undone with the K scale.
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
#ifndef STAGES
#define STAGES 3
#endif
#ifndef HPC
#define HPC 1  // kv heads per CTA
#endif
#ifndef WPH
#define WPH 4  // warps per kv head
#endif

#if KV_DTYPE == 2
#error "paged_decode_tc.cu is for float16 / bfloat16; float32 uses paged_decode.cu"
#endif

constexpr int HD = HEAD_DIM;           // the pool's head dim: rows of q, K, V and out
constexpr int DSPLIT = HD > 256 ? 2 : 1;  // warps that share a tile, each its part of the head dim
constexpr int DP = (HD + 16 * DSPLIT - 1) / (16 * DSPLIT) * (16 * DSPLIT);  // padded: whole k-steps a part
constexpr int D = DP / DSPLIT;          // the head dims one warp reads and multiplies
constexpr int T = 16;                 // tokens per warp tile
constexpr int GT = GROUP < 16 ? GROUP : 16;  // query heads of a kv head's group a warp takes: the M tile's rows
constexpr int QCH = (GROUP + GT - 1) / GT;   // chunks a group of more than 16 heads is cut into
// GS (a group past 16 heads, heads up to 256): one CTA a kv head runs every chunk, WPH warps
// each; the QCH warps of a place wi (one a chunk) take the same tiles, copy each into one
// shared stage together (a named barrier a tile), and each multiplies its own 16 heads by it,
// so the K/V is read once for the whole group. Otherwise (heads wider than 256) a CTA a chunk.
constexpr bool GS = QCH > 1 && DSPLIT == 1;
constexpr int CQ = GS ? 1 : QCH;      // CTAs a kv head's group takes
constexpr int NPW = (GS ? QCH : HPC) * WPH;  // warp pairs (DSPLIT 2) or warps: the layout's warps
constexpr int NWARPS = NPW * DSPLIT;
constexpr int NT = NWARPS * 32;
constexpr int SETS = GS ? WPH : NWARPS;  // stage sets: a warp's own, or (GS) a place's, shared by its QCH warps
constexpr int LOADERS = GS ? QCH * 32 : 32;  // threads that copy a tile
constexpr int CPR = D / ST_VEC;       // 16-byte chunks per row
constexpr int NCP = (T * CPR + LOADERS - 1) / LOADERS;  // chunks per loading thread per tile, for K and for V each
constexpr int KSTEPS = D / 16;
constexpr bool TWO = GT > 8;         // rows 8..15 of the M tile hold heads too
// a warp's part of the head dim, for the preprocessor (D above)
#define DPART (HEAD_DIM > 256 ? (HEAD_DIM + 31) / 32 * 16 : HEAD_DIM)
#if (DPART * ST_BYTES) % 128 == 0
#define SW 1
constexpr int ROW_BYTES = D * ST_BYTES;  // unpadded, swizzled
#elif KV_FP8
#define SW 0
constexpr int ROW_BYTES = (D / 16) % 2 ? D : D + 16;  // an odd number of 16-byte chunks per row
#else
#define SW 0
constexpr int ROW_BYTES = (D + 8) * ST_BYTES;  // padded by 16 bytes
#endif
constexpr int STAGE_BYTES = 2 * T * ROW_BYTES;  // K rows then V rows
constexpr int V_OFF = T * ROW_BYTES;            // V rows' offset in a stage
constexpr int R = HPC * GT;  // output rows of a CTA (its last chunk of a group past 16 heads: fewer)
static_assert(QCH == 1 || HPC == 1, "a group of more than 16 heads: one kv head a CTA");
static_assert(!GS || WPH <= 15, "GS: a named barrier (1 + wi) per place");
static_assert(NWARPS <= 16, "at most 16 warps per CTA");
static_assert(DSPLIT == 1 || !KV_FP8, "FP8 pools of heads wider than 256 are not built");

// The merge of the last split CTA (see the end of paged_decode_tc): out rows row0 .. row0 + nr - 1
// from their num_splits partial slots, as merge_splits does. Not inlined: its registers are
// not the decode loop's.
__device__ __noinline__ void merge_slots(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                         kv_t* __restrict__ out, long long row0, int nr, int parts,
                                         int num_splits, unsigned char* smem_raw)
{
    const int tid = threadIdx.x;
    __threadfence();  // each thread's reads of the other CTAs' partials come after the count
    constexpr int C4 = HD / 4;  // float4 columns of a row
    // The slots' partials of the CTA's nr rows come into the (free) stages at once: [slot][row][HD],
    // then their log2-sum-exps [row][slot]; where they do not fit, each thread loads its own.
    float* const ms = reinterpret_cast<float*>(smem_raw);
    float* const ml = ms + (long long)num_splits * nr * HD;
    const bool staged = (long long)num_splits * nr * (HD + 1) * 4 <= (long long)SETS * STAGES * STAGE_BYTES;
    if (staged) {
        for (int i = tid; i < num_splits * nr * C4; i += NT) {
            const int sp = i / (nr * C4), r = i / C4 % nr, c = i % C4;
            cp_async16(ms + ((long long)sp * nr + r) * HD + c * 4, part_o + ((row0 + r) * parts + sp) * HD + c * 4, true);
        }
        cp_commit();
        for (int i = tid; i < nr * num_splits; i += NT) ml[i] = __ldcg(part_lse + (row0 + i / num_splits) * parts + i % num_splits);
        cp_wait<0>();
        __syncthreads();
    }
    for (int idx = tid; idx < nr * C4; idx += NT) {
        const int r = idx / C4, c = idx % C4;
        const long long row = row0 + r;
        const float* pl = staged ? ml + r * num_splits : part_lse + row * parts;
        float m = NEG_INF;  // the slots' weights: 2^(lse - max)
        for (int sp = 0; sp < num_splits; ++sp) m = fmaxf(m, staged ? pl[sp] : __ldcg(pl + sp));
        float l = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
        for (int sp = 0; sp < num_splits; ++sp) {
            const float ls = staged ? pl[sp] : __ldcg(pl + sp);
            const float4 v = staged ? *reinterpret_cast<const float4*>(ms + ((long long)sp * nr + r) * HD + c * 4)
                                    : __ldcg(reinterpret_cast<const float4*>(part_o + (row * parts + sp) * HD) + c);
            const bool empty = ls == NEG_INF;  // its columns may hold anything: a select, not a product
            const float w = empty ? 0.f : exp2f(ls - m);
            l += w;
            acc.x += empty ? 0.f : w * v.x; acc.y += empty ? 0.f : w * v.y;
            acc.z += empty ? 0.f : w * v.z; acc.w += empty ? 0.f : w * v.w;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        kv_t* o = out + row * HD + c * 4;
        o[0] = from_float(acc.x * inv); o[1] = from_float(acc.y * inv);
        o[2] = from_float(acc.z * inv); o[3] = from_float(acc.w * inv);
    }
}

extern "C" __global__ void __launch_bounds__(NT) paged_decode_tc(
    const kv_t* __restrict__ q,             // [num_items, num_q_heads, HEAD_DIM]
    const st_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ item_seq,       // [num_items]
    const int* __restrict__ item_len,       // [num_items]
    kv_t* __restrict__ out,                 // [num_items, num_q_heads, HEAD_DIM] (parts == 0)
    float* __restrict__ part_o,             // [num_items, num_q_heads, num_splits, HEAD_DIM]
    float* __restrict__ part_lse,           // [num_items, num_q_heads, num_splits]
    int layer, int num_layers, int num_kv_heads, int max_blocks, int num_splits,
    const int* __restrict__ item_start, int parts,
    const float* __restrict__ kv_scales,    // [num_layers, 2, num_kv_heads] (KV_FP8; else unused)
    int* __restrict__ merge_ctr,            // [num_items * num_kv_heads / HPC * QCH], zero between launches, or null
    int window, float softcap, float scale_log2)
{
    pdl_launch_dependents();  // a programmatic merge launch may start now: it waits for the partials itself
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3, mi = lane >> 3;
    const int pw = warp / DSPLIT, part = warp % DSPLIT;  // the layout's warp (a pair), this warp's part of it
    const int hh = pw / WPH, wi = pw % WPH;  // its head in the chunk (GS: its chunk of the group), its place among WPH
    const int set = GS ? wi : warp;          // its stage set
#if SW
    unsigned char* const wsm = smem_raw + ((128u - (smem_addr(smem_raw) & 127u)) & 127u) + set * STAGES * STAGE_BYTES;
#else
    unsigned char* const wsm = smem_raw + set * STAGES * STAGE_BYTES;
#endif
    // DSPLIT > 1: each warp's partial scores, two tiles' worth ([warps][2][8][32 lanes]), after the stages
    float* const xs = reinterpret_cast<float*>(smem_raw + (SW ? 128 : 0) + SETS * STAGES * STAGE_BYTES);
    // Where 16-byte chunk c of row r of stage st's K tile (V: + V_OFF) sits.
    auto at = [&](int st, int r, int c) -> unsigned char* {
#if SW
        return wsm + st * STAGE_BYTES + (c >> 3) * T * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
#else
        return wsm + st * STAGE_BYTES + r * ROW_BYTES + c * 16;
#endif
    };

    const int nhc = num_kv_heads / HPC;
    const int unit = blockIdx.x % (nhc * CQ);  // (chunk of HPC kv heads, chunk of a group past 16 heads)
    const int hc = unit / CQ, qc = GS ? hh : unit % CQ;
    const int item = blockIdx.x / (nhc * CQ);
    const int nrows = QCH == 1 ? GT : min(GT, GROUP - qc * GT);  // query heads of this warp's M tile
    const int h = hc * HPC + (GS ? 0 : hh);
    const int split = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;
    const int head0 = h * GROUP + qc * GT;

    const int len = item_len[item];
    int lo = window > 0 ? max(0, len - window) : 0;  // the first position seen
    if (item_start != nullptr) lo = max(lo, item_start[item]);  // after its shared prefix (cascade)
    const int from = lo / T * T;
    int chunk = (len - from + num_splits - 1) / num_splits;
    chunk = (chunk + T - 1) / T * T;
    const int start = from + split * chunk;
    const int end = min(len, start + chunk);
    const int ntiles = end > start ? (end - start + T - 1) / T : 0;
    const int nw = ntiles > wi ? (ntiles - wi + WPH - 1) / WPH : 0;  // this warp's tiles

    // Q as A fragments: rows gid and gid + 8 are heads head0 + gid (+ 8), zero past the group.
    unsigned qa[KSTEPS][4];
    {
        const unsigned* qw = reinterpret_cast<const unsigned*>(
            q + ((long long)item * num_q_heads + head0) * HD + part * D);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#if KV_FP8
            const int c = kk * 16 + 4 * tig, c2 = c + 2;  // the permuted k order (kvpager_mma.cuh)
#else
            const int c = kk * 16 + 2 * tig, c2 = c + 8;
#endif
            // (a wide head's pad columns: 0)
            const bool in = DP == HD || part * D + c < HD, in2 = DP == HD || part * D + c2 < HD;
            qa[kk][0] = gid < nrows && in ? qw[(gid * HD + c) / 2] : 0u;
            qa[kk][2] = gid < nrows && in2 ? qw[(gid * HD + c2) / 2] : 0u;
            qa[kk][1] = TWO && gid + 8 < nrows && in ? qw[((gid + 8) * HD + c) / 2] : 0u;
            qa[kk][3] = TWO && gid + 8 < nrows && in2 ? qw[((gid + 8) * HD + c2) / 2] : 0u;
        }
    }

    const int* table = block_tables + (long long)item_seq[item] * max_blocks;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * HD;
    const long long k_off = ((long long)layer * 2 * num_kv_heads + h) * BLOCK_SIZE * HD + part * D;
    const long long vk = (long long)num_kv_heads * BLOCK_SIZE * HD;  // V rows sit this far after K

    // Block ids of tile k of this warp (two when a block holds fewer than T tokens; the first
    // is not read when the window starts past it).
    auto lookup = [&](int k, int& x0, int& x1) {
        const int t0 = start + (wi + WPH * k) * T;
        x0 = k < nw && t0 + BLOCK_SIZE > lo ? __ldg(table + t0 / BLOCK_SIZE) : 0;
        x1 = (BLOCK_SIZE < T && k < nw && t0 + BLOCK_SIZE < end) ? __ldg(table + t0 / BLOCK_SIZE + 1) : 0;
    };
    // cp.async of tile k's K and V rows into stage st.
    auto issue = [&](int k, int st, int x0, int x1) {
        const int t0 = start + (wi + WPH * k) * T;
        const st_t* p0 = pool + (long long)x0 * block_stride + k_off
                         + (BLOCK_SIZE >= T ? (t0 % BLOCK_SIZE) * HD : 0);
        const st_t* p1 = pool + (long long)x1 * block_stride + k_off;
        const int li = GS ? hh * 32 + lane : lane;  // (GS: the place's QCH warps copy the tile together)
#pragma unroll
        for (int i = 0; i < NCP; ++i) {
            const int c = li + LOADERS * i, row = c / CPR, col = (c % CPR) * ST_VEC;
            if ((T * CPR) % LOADERS != 0 && c >= T * CPR) break;  // FP8 rows of an odd chunk count; GS's spare threads
            // zero-filled outside [lo, end), and in a wide head's pad columns
            const bool ok = t0 + row < end && t0 + row >= lo && (DP == HD || part * D + col < HD);
            const st_t* src = ((BLOCK_SIZE < T && row >= BLOCK_SIZE) ? p1 + (row - BLOCK_SIZE) * HD
                                                                     : p0 + row * HD) + col;
            unsigned char* dst = at(st, row, c % CPR);
            cp_async16(dst, ok ? src : pool, ok);
            cp_async16(dst + V_OFF, ok ? src + vk : pool, ok);
        }
    };

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
#if KV_FP8
    float k_scale = kv_scales[(layer * 2) * num_kv_heads + h];
#if KV_DTYPE == 1
    {   // q (bfloat16) -> float16 operands, times 2^p so its largest value fits float16
        float amax = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                amax = fmaxf(amax, fmaxf(fabsf(__uint_as_float(qa[kk][e] << 16)),
                                         fabsf(__uint_as_float(qa[kk][e] & 0xffff0000u))));
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const int p = q_range_exp(amax);
        const float mul = exp2i(p);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[kk][e] = bf16x2_to_f16x2(qa[kk][e], mul);
        k_scale *= exp2i(-p);  // the scores of the scaled q, back in q . k units
    }
#endif
#endif

    int x0, x1;
    lookup(0, x0, x1);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nw) issue(s, s, x0, x1);
        lookup(s + 1, x0, x1);
        cp_commit();
    }
    int st = 0, ist = STAGES - 1;
    for (int k = 0; k < nw; ++k) {
        if constexpr (GS) {
            // tile k is in (each thread waited for its own copies; the barrier shows them to the
            // place's warps), and every warp of the place is done with tile k - 1, whose stage
            // (ist) takes tile k + STAGES - 1 now
            cp_wait<STAGES - 2>();
            asm volatile("bar.sync %0, %1;" ::"r"(1 + wi), "n"(QCH * 32) : "memory");
            if (k + STAGES - 1 < nw) issue(k + STAGES - 1, ist, x0, x1);
            lookup(k + STAGES, x0, x1);
            cp_commit();
        } else {
            if (k + STAGES - 1 < nw) issue(k + STAGES - 1, ist, x0, x1);
            lookup(k + STAGES, x0, x1);
            cp_commit();
            cp_wait<STAGES - 1>();
            __syncwarp();
        }

        // S = Q K^T for the tile's 16 tokens (two n-tiles of 8), two accumulator sets.
        float s[2][4], s2[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = s2[j][e] = 0.f;
#if KV_FP8
        // One ldmatrix.x4 per two 16-dim chunks: matrices (tokens 0-7 | 8-15) x (chunk kc | kc + 1).
#pragma unroll
        for (int kc = 0; kc < KSTEPS; kc += 2) {
            if (kc + 1 < KSTEPS) {
                unsigned r[4];
                ldsm_x4(r, at(st, (mi >> 1) * 8 + (lane & 7), kc + (mi & 1)));
                mma_fp8_k(s[0], qa[kc], r[0]);
                mma_fp8_k(s[1], qa[kc], r[2]);
                mma_fp8_k(s2[0], qa[kc + 1], r[1]);
                mma_fp8_k(s2[1], qa[kc + 1], r[3]);
            } else {
                unsigned r[2];
                ldsm_x2(r, at(st, (mi & 1) * 8 + (lane & 7), kc));
                mma_fp8_k(s[0], qa[kc], r[0]);
                mma_fp8_k(s[1], qa[kc], r[1]);
            }
        }
#else
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned bk[4];
            ldsm_x4(bk, at(st, (mi >> 1) * 8 + (lane & 7), 2 * kk + (mi & 1)));
            float (&acc)[2][4] = (kk & 1) ? s2 : s;
            mma16816(acc[0], qa[kk], bk[0], bk[1]);
            mma16816(acc[1], qa[kk], bk[2], bk[3]);
        }
#endif
        const int t0 = start + (wi + WPH * k) * T;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] += s2[j][e];
        if constexpr (DSPLIT > 1) {  // this warp's half of q . k, and its partner's added: the whole S in both
            float* mine = xs + ((warp * 2 + (k & 1)) * 8) * 32 + lane;
            const float* theirs = xs + (((warp ^ 1) * 2 + (k & 1)) * 8) * 32 + lane;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) mine[(j * 4 + e) * 32] = s[j][e];
            // the pair only; a buffer is written again two tiles on, after the partner's next arrival
            asm volatile("bar.sync %0, %1;" ::"r"(1 + pw), "n"(32 * DSPLIT) : "memory");
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] += theirs[(j * 4 + e) * 32];
        }
#if KV_FP8
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] *= k_scale;  // raw q . k of the dequantised K
#endif
        if (softcap > 0.f) {
            const float inv = 1.f / softcap;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = softcap * tanhf(s[j][e] * inv);
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int pos = t0 + j * 8 + 2 * tig + e;
                const bool ok = pos < end && pos >= lo;
                s[j][e] = ok ? s[j][e] : NEG_INF;
                mx0 = fmaxf(mx0, s[j][e]);
                if (TWO) {
                    s[j][2 + e] = ok ? s[j][2 + e] : NEG_INF;
                    mx1 = fmaxf(mx1, s[j][2 + e]);
                }
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        if (TWO) {
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        }
        // Every tile holds a valid token (the first tile holds lo), so mx0 (and mx1) are finite here.
        const float c0 = exp2f((m0 - mx0) * scale_log2);
        const float c1 = TWO ? exp2f((m1 - mx1) * scale_log2) : 0.f;
        m0 = mx0; m1 = mx1;
        const float b0 = mx0 * scale_log2, b1 = mx1 * scale_log2;
        l0 *= c0;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) { o[n][0] *= c0; o[n][1] *= c0; }
        if (TWO) {
            l1 *= c1;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) { o[n][2] *= c1; o[n][3] *= c1; }
        }
        // P = exp2(S * scale - m * scale), packed straight into the A fragment of P V.
        unsigned pa[4];
        {
            const float e00 = exp2f(fmaf(s[0][0], scale_log2, -b0));
            const float e01 = exp2f(fmaf(s[0][1], scale_log2, -b0));
            const float e10 = exp2f(fmaf(s[1][0], scale_log2, -b0));
            const float e11 = exp2f(fmaf(s[1][1], scale_log2, -b0));
            l0 += (e00 + e01) + (e10 + e11);
            pa[0] = pack2_mma(e00, e01);
            pa[2] = pack2_mma(e10, e11);
            if (TWO) {
                const float f00 = exp2f(fmaf(s[0][2], scale_log2, -b1));
                const float f01 = exp2f(fmaf(s[0][3], scale_log2, -b1));
                const float f10 = exp2f(fmaf(s[1][2], scale_log2, -b1));
                const float f11 = exp2f(fmaf(s[1][3], scale_log2, -b1));
                l1 += (f00 + f01) + (f10 + f11);
                pa[1] = pack2_mma(f00, f01);
                pa[3] = pack2_mma(f10, f11);
            } else {
                pa[1] = pa[3] = 0u;
            }
        }
#if KV_FP8
        // One ldmatrix.x4.trans per two 16-dim chunks: matrices (tokens 0-7 | 8-15) x (chunk | chunk + 1).
#pragma unroll
        for (int vc = 0; vc < KSTEPS; vc += 2) {
            if (vc + 1 < KSTEPS) {
                unsigned r[4];
                ldsm_x4_t(r, at(st, (mi & 1) * 8 + (lane & 7), vc + (mi >> 1)) + V_OFF);
                mma_fp8_v(o[2 * vc], o[2 * vc + 1], pa, r[0], r[1]);
                mma_fp8_v(o[2 * vc + 2], o[2 * vc + 3], pa, r[2], r[3]);
            } else {
                unsigned r[2];
                ldsm_x2_t(r, at(st, (mi & 1) * 8 + (lane & 7), vc) + V_OFF);
                mma_fp8_v(o[2 * vc], o[2 * vc + 1], pa, r[0], r[1]);
            }
        }
#else
#pragma unroll
        for (int np = 0; np < KSTEPS; ++np) {
            unsigned bv[4];
            ldsm_x4_t(bv, at(st, (mi & 1) * 8 + (lane & 7), 2 * np + (mi >> 1)) + V_OFF);
            mma16816(o[2 * np], pa, bv[0], bv[1]);
            mma16816(o[2 * np + 1], pa, bv[2], bv[3]);
        }
#endif
        if constexpr (!GS) __syncwarp();  // every lane is done with stage st before it is refilled
        st = st + 1 == STAGES ? 0 : st + 1;
        ist = ist + 1 == STAGES ? 0 : ist + 1;
    }
    cp_wait<0>();

    // Row sums over the 4 lanes of a row; m is in raw score units, turn it into log2 units.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    m0 = m0 == NEG_INF ? NEG_INF : m0 * scale_log2;
    m1 = m1 == NEG_INF ? NEG_INF : m1 * scale_log2;

    // Merge the warps of each head through shared memory (the stages are free now).
    __shared__ float sm_m[NPW][16], sm_l[NPW][16];
    __syncthreads();
    float* sm_o = reinterpret_cast<float*>(smem_raw);  // [NPW][GT][HD]
    constexpr int NO = (HD - (DSPLIT - 1) * D) / 8;  // the last part's n-tiles within the head dim
    const int nout = part == DSPLIT - 1 ? NO : D / 8;
    // Where accumulator column e (0, 1) of n-tile n sits in the row: FP8's P V leaves dims
    // 4 tig + (0, 2) of chunk n / 2 in the even n-tiles and 4 tig + (1, 3) in the odd ones.
#if KV_FP8
#define OCOL(n, e) (((n) >> 1) * 16 + 4 * tig + 2 * (e) + ((n) & 1))
#else
#define OCOL(n, e) ((n) * 8 + 2 * tig + (e))
#endif
    // (the two warps of a pair hold the same m and l; each its own columns of o)
    if (gid < nrows) {
        if (tig == 0 && part == 0) { sm_m[pw][gid] = m0; sm_l[pw][gid] = l0; }
        float* r = sm_o + (pw * GT + gid) * HD + part * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            if (n < nout) { r[OCOL(n, 0)] = o[n][0]; r[OCOL(n, 1)] = o[n][1]; }
    }
    if (TWO && gid + 8 < nrows) {
        if (tig == 0 && part == 0) { sm_m[pw][gid + 8] = m1; sm_l[pw][gid + 8] = l1; }
        float* r = sm_o + (pw * GT + gid + 8) * HD + part * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            if (n < nout) { r[OCOL(n, 0)] = o[n][2]; r[OCOL(n, 1)] = o[n][3]; }
    }
#undef OCOL
    __syncthreads();
    const long long row0 = (long long)item * num_q_heads + (long long)hc * HPC * GROUP + (GS ? 0 : qc * GT);
    const int nr = GS ? GROUP : QCH == 1 ? R : nrows;  // output rows (HPC is 1 where QCH > 1)
    for (int idx = tid; idx < nr * HD; idx += NT) {
        const int r = idx / HD, d = idx % HD;
        const int g = r % GT, w0 = (r / GT) * WPH;  // the head's warps: w0 .. w0 + WPH - 1
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < WPH; ++w) mx = fmaxf(mx, sm_m[w0 + w][g]);
        float lsum = 0.f, acc = 0.f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int w = 0; w < WPH; ++w) {
                const float a = exp2f(sm_m[w0 + w][g] - mx);
                lsum += sm_l[w0 + w][g] * a;
                acc += sm_o[((w0 + w) * GT + g) * HD + d] * a;
            }
        }
        const long long row = row0 + r;
#if KV_FP8
        const float v_scale = kv_scales[(layer * 2 + 1) * num_kv_heads + hc * HPC + (GS ? 0 : r / GT)];
#else
        const float v_scale = 1.f;
#endif
        const float res = lsum > 0.f ? acc / lsum * v_scale : 0.f;
        if (parts == 0) {
            out[row * HD + d] = from_float(res);
        } else {
            part_o[(row * parts + split) * HD + d] = res;
            if (d == 0) part_lse[row * parts + split] = lsum > 0.f ? mx + __log2f(lsum) : NEG_INF;
            // slots num_splits.. are the cascade's (cascade_prefix fills its members', maybe
            // at the same time): never written here; merge_splits reads a row's only where
            // its level mask says it is a member
        }
    }
    if (merge_ctr == nullptr) return;
    // The merge, here: the last of the item's num_splits CTAs for these heads to finish (the
    // count merge_ctr[blockIdx.x] says which, and is set back to zero) merges their partial
    // slots into out, as merge_splits would (no cascade, no sinks).
    __shared__ int last;
    __threadfence();  // this thread's partials are visible before the CTA is counted
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(merge_ctr + blockIdx.x, 1) == num_splits - 1;
        if (last) {
            __threadfence();  // acquire: the counted CTAs' partials are read after their count
            atomicExch(merge_ctr + blockIdx.x, 0);
        }
    }
    __syncthreads();
    if (!last) return;
    merge_slots(part_o, part_lse, out, row0, nr, parts, num_splits, smem_raw);
}
