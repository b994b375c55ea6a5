// paged_decode_bulk.cu: decode attention (one query token per work item) for
// float16 / bfloat16 pools on Hopper (sm_90): each CTA reads whole blocks of
// its kv heads through the bulk copy engine. Same signature, grid and outputs
// as paged_decode_tc.cu (read its header for item_start, window, softcap,
// parts and the partial slots); FP8 pools, GQA groups over 4, odd kv head
// counts and block sizes under 8 use that kernel.
//
// Why: a decode step's K/V bytes are read once, and the card reads a pool
// gathered in whole 64 KiB blocks faster through plain bulk copies
// (cp.async.bulk) than through 16-byte loads of any kind (H200: 91.5% of its
// 4.8 TB/s against 89.6% at best; docs/gpu-notes.md v21). A bulk copy lands
// rows as stored, unswizzled: 256-byte rows (head dim 128), where the MMA's
// fragment loads of eight rows of one head would conflict eight ways. So the
// MMA tiles here pair two kv heads (A and B) and interleave their rows:
//
// - A stage holds the 16 positions [t0, t0 + 16) of HPC kv heads as the pool
//   stores a block: K rows of each head, then V rows of each head, 16 rows of
//   HEAD_DIM values a (K|V, head) piece. With blocks of 16 positions, a stage
//   whose positions are all the CTA's is one bulk copy (every kv head of the
//   pool in the CTA) or two (K, V); else one copy per piece of the rows the
//   CTA reads.
// - S^T = K' Q'^T on mma.sync m16n8k16 for 8 positions of a head pair: the 16
//   rows of K' are (head A, position i), (head B, position i), i = 0..7 in
//   turn (rows 2i and 2i + 1); the 8 columns of Q'^T are head A's GROUP query
//   heads (columns 0..3) and head B's (4..7). Only entries of a row and column
//   of the same head count; the others are masked. The head dim (the k order)
//   is permuted alike for K' and Q': a lane's load q reads 16 contiguous bytes
//   of a row, chunk 4q + tig (q = 0 .. HEAD_DIM / 32 - 1), whose four 32-bit
//   words are its fragment words of k-steps 2q and 2q + 1. Lanes of head B's
//   rows issue their loads q and q ^ 1 the other way round (and swap the
//   results), so a quarter warp's loads read 64 bytes of a head A row and the
//   other 64-byte half of the 128 of a head B row: no bank conflict.
// - O^T += V'^T P'^T: V' rows as K' rows (same loads), each 8x8 16-bit matrix
//   turned by movmatrix.trans into the A fragment (rows: 8 head dims, k: the
//   16 (head, position) rows); P'^T, the softmax of S^T with the other head's
//   entries zero, comes from the S accumulator by two movmatrix.trans. The
//   output rows are head dims in the permuted order, the columns the pair's
//   query heads: each lane keeps the softmax state of its own two columns.
//
// Threads: HPC / 2 * WPP consumer warps (a head pair each, WPP warps taking
// the pair's 8-position halves of each stage) and one producer warp whose
// lanes issue a stage's copies on the stage's full mbarrier (expect-tx of
// the stage's bytes); the consumer warps arrive on the stage's empty mbarrier
// once its K and V rows are in their registers, before their math. Rows of a stage
// outside the CTA's positions are not copied: their scores are masked and
// their V values zeroed in registers (the shared memory there may hold
// anything). Splits: the positions [lo, len) in num_splits equal runs of
// positions (not of tiles), so every CTA reads the same number of bytes.
// Dynamic shared memory: STAGES * 2 * HPC * 16 * HEAD_DIM * 2 + 128
// (to align the stages); at least CW * 8 * (HEAD_DIM + 2) * 4 for the final
// merge of a pair's warps, which reuses the stages.
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
#define HPC 8  // kv heads per CTA (pairs of heads)
#endif
#ifndef WPP
#define WPP 2  // consumer warps per head pair
#endif

#if KV_DTYPE == 2 || KV_FP8
#error "paged_decode_bulk.cu is for float16 / bfloat16 pools; FP8 and float32 use paged_decode_tc.cu / paged_decode.cu"
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "paged_decode_bulk.cu needs sm_90 (bulk copies, mbarrier transaction counts)"
#endif

constexpr int D = HEAD_DIM;
constexpr int T = 16;                          // positions per stage
constexpr int ROWB = D * 2;                    // bytes of a row
constexpr int PIECE = T * ROWB;                // a (K|V, head) piece of a stage
constexpr int STAGE_BYTES = 2 * HPC * PIECE;   // K pieces of the heads, then V pieces
constexpr int NPAIR = HPC / 2;
constexpr int CW = NPAIR * WPP;                // consumer warps
constexpr int NT = (CW + 1) * 32;
constexpr int NQ = D / 32;                     // 16-byte loads per row and lane (4 lanes a row)
constexpr int TPW = 2 / WPP;                   // 8-position pair tiles per warp and stage
constexpr int BSP = BLOCK_SIZE < T ? BLOCK_SIZE : T;  // positions of a stage in one block
constexpr int NSUB = T / BSP;                  // blocks a stage spans
constexpr int NCOPY = 2 * HPC * NSUB;          // copies of a full stage
static_assert(GROUP >= 1 && GROUP <= 4, "a head pair's query heads are the 8 columns of an MMA: GQA groups up to 4");
static_assert(HPC % 2 == 0 && HPC >= 2, "kv heads per CTA come in pairs");
static_assert(WPP == 1 || WPP == 2, "one or two warps per head pair");
static_assert(D % 32 == 0, "head dims of whole 16-byte chunks for each of a row's 4 lanes");
static_assert(BLOCK_SIZE % 8 == 0, "block sizes of whole 8-position pair tiles");
static_assert(NCOPY <= 32, "a stage's copies are one per producer lane");
static_assert(CW <= 16, "at most 16 consumer warps");

__device__ __forceinline__ unsigned movm_t(unsigned x) {
    unsigned r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}
__device__ __forceinline__ void bar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_arrive_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// ``bytes`` (a multiple of 16) global -> shared by the bulk copy engine, completing
// transactions of the mbarrier ``bar``; CP_EVICT_FIRST: an L2 evict-first policy.
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
#if CP_EVICT_FIRST
    asm volatile("{\n.reg .b64 pol;\ncreatepolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
                 "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], pol;\n}\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#else
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}

extern "C" __global__ void __launch_bounds__(NT, 1) paged_decode_bulk(
    const kv_t* __restrict__ q,             // [num_items, num_q_heads, HEAD_DIM]
    const kv_t* __restrict__ pool,          // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]
    const int* __restrict__ block_tables,   // [num_seqs, max_blocks]
    const int* __restrict__ item_seq,       // [num_items]
    const int* __restrict__ item_len,       // [num_items]
    kv_t* __restrict__ out,                 // [num_items, num_q_heads, HEAD_DIM] (parts == 0)
    float* __restrict__ part_o,             // [num_items, num_q_heads, parts, HEAD_DIM]
    float* __restrict__ part_lse,           // [num_items, num_q_heads, parts]
    int layer, int num_layers, int num_kv_heads, int max_blocks, int num_splits,
    const int* __restrict__ item_start, int parts,
    const float* __restrict__ kv_scales,    // unused (FP8 pools use paged_decode_tc.cu)
    int window, float softcap, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ __align__(8) unsigned long long bars[2 * STAGES];  // full[STAGES], then empty[STAGES]
    unsigned char* const sm = smem_raw + ((128u - (smem_addr(smem_raw) & 127u)) & 127u);
    const unsigned sm0 = smem_addr(sm);
    const unsigned full0 = smem_addr(&bars[0]), empty0 = smem_addr(&bars[STAGES]);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;

    const int nhc = num_kv_heads / HPC;
    const int hc = blockIdx.x % nhc;
    const int item = blockIdx.x / nhc;
    const int split = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;

    // The item's length, sequence and first position in one round of loads (the block table
    // read waits on them).
    const int len = item_len[item];
    const int seq = item_seq[item];
    const int first = item_start != nullptr ? item_start[item] : 0;  // after its shared prefix (cascade)
    int lo = window > 0 ? max(0, len - window) : 0;  // the first position seen
    lo = max(lo, first);
    const int total = max(0, len - lo);
    const int chunk = (total + num_splits - 1) / num_splits;
    const int cs = lo + min(total, split * chunk);        // this CTA's positions: [cs, ce)
    const int ce = lo + min(total, (split + 1) * chunk);
    const int tfirst = cs / T * T;
    const int ntiles = ce > cs ? (ce - 1) / T - cs / T + 1 : 0;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            bar_init(full0 + 8 * s, 1);
            bar_init(empty0 + 8 * s, CW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    // Every warp's softmax state (consumers: columns 2 tig, 2 tig + 1 of their pair).
    float ma = NEG_INF, mb = NEG_INF, la = 0.f, lb = 0.f;
    float o[NQ][2][4];
#pragma unroll
    for (int i = 0; i < NQ; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) o[i][j][0] = o[i][j][1] = o[i][j][2] = o[i][j][3] = 0.f;

    if (warp == CW) {
        // Producer: lane l keeps the block ids of blocks b0 + 32 c + l (c = cur's chunk) and of
        // the chunk after it, fetched a chunk ahead.
        const int* table = block_tables + (long long)seq * max_blocks;
        const int b0 = tfirst / BLOCK_SIZE;
        const int nblk = ntiles > 0 ? (tfirst + ntiles * T - 1) / BLOCK_SIZE - b0 + 1 : 0;
        auto fetch = [&](int c) {
            const int j = 32 * c + lane;
            return j < nblk ? __ldg(table + b0 + j) : 0;
        };
        int cur = fetch(0), nxt = fetch(1), ccur = 0;
        const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * D;
        // This lane's piece of a stage copied piece by piece: K or V, head, block of the stage.
        const int kv = lane / (HPC * NSUB), hh = (lane / NSUB) % HPC, sub = lane % NSUB;
        const long long layer_off = (long long)layer * 2 * num_kv_heads * BLOCK_SIZE * D;
        const long long piece_off = layer_off + ((long long)kv * num_kv_heads + hc * HPC + hh) * BLOCK_SIZE * D;
        const unsigned dst0 = sm0 + (kv * HPC + hh) * PIECE;
        // Whole stages of blocks of 16: one copy of every kv head's K and V where the CTA holds
        // all of the pool's heads, else one for K and one for V.
        constexpr bool WHOLE = BLOCK_SIZE == T;
        const bool all_heads = HPC == num_kv_heads;
        for (int k = 0; k < ntiles; ++k) {
            const int st = k % STAGES;
            if (k >= STAGES) bar_wait(empty0 + 8 * st, ((k / STAGES) - 1) & 1);
            const int t0 = tfirst + k * T;
            const int a = max(cs, t0) - t0, b = min(ce, t0 + T) - t0;  // rows [a, b) of the stage
            const int j0 = t0 / BLOCK_SIZE - b0;
            while (j0 >= 32 * (ccur + 1)) {
                cur = nxt;
                ++ccur;
                nxt = fetch(ccur + 1);
            }
            int id = 0;
#pragma unroll
            for (int s = 0; s < NSUB; ++s) {
                const int src = j0 + s - 32 * ccur;  // < 64
                const int vc = __shfl_sync(0xffffffffu, cur, src & 31);
                const int vn = __shfl_sync(0xffffffffu, nxt, src & 31);
                if (s == sub) id = src < 32 ? vc : vn;
            }
            if (lane == 0) bar_arrive_tx(full0 + 8 * st, (unsigned)((b - a) * ROWB * 2 * HPC));
            __syncwarp();
            const st_t* blk = pool + (long long)id * block_stride;
            if (WHOLE && a == 0 && b == T) {
                constexpr unsigned HALF = HPC * PIECE;  // one kv kind's rows of the chunk's heads
                if (all_heads) {
                    if (lane == 0) bulk_copy(sm0 + st * STAGE_BYTES, blk + layer_off, 2 * HALF, full0 + 8 * st);
                } else if (lane < 2) {
                    bulk_copy(sm0 + st * STAGE_BYTES + lane * HALF,
                              blk + layer_off + ((long long)lane * num_kv_heads + hc * HPC) * T * D, HALF,
                              full0 + 8 * st);
                }
            } else if (lane < NCOPY) {
                const int r0 = max(a, sub * BSP), r1 = min(b, (sub + 1) * BSP);
                if (r1 > r0) {
                    const int row = BLOCK_SIZE >= T ? t0 % BLOCK_SIZE + r0 : r0 - sub * BSP;
                    bulk_copy(dst0 + st * STAGE_BYTES + r0 * ROWB, blk + piece_off + (long long)row * D,
                              (unsigned)((r1 - r0) * ROWB), full0 + 8 * st);
                }
            }
        }
    } else {
        const int pr = warp / WPP, wi = warp % WPP;
        // Q'^T as B fragments: column gid is query head (gid & 3) of the pair's head gid >> 2;
        // k-steps 2 qq and 2 qq + 1 are the four words of chunk 4 qq + tig of its row.
        unsigned qb[2 * NQ][2];
        {
            const int g = gid & 3;
            const int qh = (hc * HPC + 2 * pr + (gid >> 2)) * GROUP + g;
            const uint4* qrow = reinterpret_cast<const uint4*>(q + ((long long)item * num_q_heads + qh) * D);
#pragma unroll
            for (int qq = 0; qq < NQ; ++qq) {
                const uint4 v = g < GROUP ? qrow[4 * qq + tig] : make_uint4(0u, 0u, 0u, 0u);
                qb[2 * qq][0] = v.x; qb[2 * qq][1] = v.y;
                qb[2 * qq + 1][0] = v.z; qb[2 * qq + 1][1] = v.w;
            }
        }
        // This lane's K' rows: gid (head A or B by gid & 1, position gid >> 1) and gid + 8
        // (position 4 + (gid >> 1)); chunk tig of each 64-byte group.
        const unsigned kbase = sm0 + (2 * pr + (gid & 1)) * PIECE + (gid >> 1) * ROWB + tig * 16;
        const bool odd = gid & 1;  // a head B row: loads q and q ^ 1 swapped
        auto rot = [](int qq) { return (qq ^ 1) < NQ ? qq ^ 1 : qq; };
        // Rows gid and gid + 8 (4 rows on) of the pair tile at ``at``: chunks 4 qq + tig into r0, r1.
        auto load_rows = [&](unsigned at, uint4 (&r0)[NQ], uint4 (&r1)[NQ]) {
            uint4 t0[NQ], t1[NQ];
#pragma unroll
            for (int qq = 0; qq < NQ; ++qq) {
                const unsigned c = at + (odd ? rot(qq) : qq) * 64;
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(t0[qq].x), "=r"(t0[qq].y), "=r"(t0[qq].z), "=r"(t0[qq].w) : "r"(c));
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(t1[qq].x), "=r"(t1[qq].y), "=r"(t1[qq].z), "=r"(t1[qq].w) : "r"(c + 4 * ROWB));
            }
#pragma unroll
            for (int qq = 0; qq < NQ; ++qq) {
                r0[qq] = odd ? t0[rot(qq)] : t0[qq];
                r1[qq] = odd ? t1[rot(qq)] : t1[qq];
            }
        };
        const bool mine = (gid & 1) == (tig >> 1);  // row and columns of the same head
        for (int k = 0; k < ntiles; ++k) {
            const int st = k % STAGES;
            bar_wait(full0 + 8 * st, (k / STAGES) & 1);
            const int t0 = tfirst + k * T;
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
                const int tb = (wi * TPW + u) * 8;  // the pair tile's first row in the stage
                const bool seen = t0 + tb + 8 > cs && t0 + tb < ce;  // some of its positions are this CTA's
                uint4 kr0[NQ], kr1[NQ], vr0[NQ], vr1[NQ];
                if (seen) {
                    const unsigned ka = kbase + st * STAGE_BYTES + tb * ROWB;
                    load_rows(ka, kr0, kr1);
                    load_rows(ka + HPC * PIECE, vr0, vr1);
                }
                if (u == TPW - 1) {  // the stage is in registers: the producer may refill it
                    __syncwarp();
                    if (lane == 0) bar_arrive(empty0 + 8 * st);
                }
                if (!seen) continue;
                float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int qq = 0; qq < NQ; ++qq) {
                    const unsigned a0[4] = {kr0[qq].x, kr1[qq].x, kr0[qq].y, kr1[qq].y};
                    const unsigned a1[4] = {kr0[qq].z, kr1[qq].z, kr0[qq].w, kr1[qq].w};
                    mma16816(s, a0, qb[2 * qq][0], qb[2 * qq][1]);
                    mma16816(s2, a1, qb[2 * qq + 1][0], qb[2 * qq + 1][1]);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) s[e] += s2[e];
                if (softcap > 0.f) {
                    const float inv = 1.f / softcap;
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[e] = softcap * tanhf(s[e] * inv);
                }
                const int pos0 = t0 + tb + (gid >> 1), pos1 = pos0 + 4;
                const bool in0 = pos0 >= cs && pos0 < ce, in1 = pos1 >= cs && pos1 < ce;
                const bool ok0 = mine && in0, ok1 = mine && in1;
                const float v0 = ok0 ? s[0] : NEG_INF, v1 = ok0 ? s[1] : NEG_INF;
                const float v2 = ok1 ? s[2] : NEG_INF, v3 = ok1 ? s[3] : NEG_INF;
                float xa = fmaxf(v0, v2), xb = fmaxf(v1, v3);
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) {
                    xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, off));
                    xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, off));
                }
                xa = fmaxf(xa, ma);
                xb = fmaxf(xb, mb);
                // A column with no position seen yet keeps its zero state (base 0, nothing added).
                const float ba = xa == NEG_INF ? 0.f : xa * scale_log2;
                const float bb = xb == NEG_INF ? 0.f : xb * scale_log2;
                const float ca = exp2f(ma * scale_log2 - ba), cb = exp2f(mb * scale_log2 - bb);
                ma = xa; mb = xb;
                const float p0 = exp2f(fmaf(v0, scale_log2, -ba)), p1 = exp2f(fmaf(v1, scale_log2, -bb));
                const float p2 = exp2f(fmaf(v2, scale_log2, -ba)), p3 = exp2f(fmaf(v3, scale_log2, -bb));
                la = la * ca + (p0 + p2);
                lb = lb * cb + (p1 + p3);
#pragma unroll
                for (int i = 0; i < NQ; ++i)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        o[i][j][0] *= ca; o[i][j][1] *= cb; o[i][j][2] *= ca; o[i][j][3] *= cb;
                    }
                const unsigned pb0 = movm_t(pack2(p0, p1)), pb1 = movm_t(pack2(p2, p3));

                if (t0 + tb < cs || t0 + tb + 8 > ce) {  // rows not copied: any bits, zeroed (P is 0 there)
#pragma unroll
                    for (int qq = 0; qq < NQ; ++qq) {
                        if (!in0) vr0[qq] = make_uint4(0u, 0u, 0u, 0u);
                        if (!in1) vr1[qq] = make_uint4(0u, 0u, 0u, 0u);
                    }
                }
#pragma unroll
                for (int qq = 0; qq < NQ; ++qq) {
                    const unsigned a0[4] = {movm_t(vr0[qq].x), movm_t(vr0[qq].y), movm_t(vr1[qq].x), movm_t(vr1[qq].y)};
                    const unsigned a1[4] = {movm_t(vr0[qq].z), movm_t(vr0[qq].w), movm_t(vr1[qq].z), movm_t(vr1[qq].w)};
                    mma16816(o[qq][0], a0, pb0, pb1);
                    mma16816(o[qq][1], a1, pb0, pb1);
                }
            }
        }
        // Column sums over the 8 rows' lanes; m in log2 units.
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            la += __shfl_xor_sync(0xffffffffu, la, off);
            lb += __shfl_xor_sync(0xffffffffu, lb, off);
        }
    }

    // Merge the WPP warps of each pair through shared memory (the stages are free: every copy
    // landed before its stage was read).
    __syncthreads();
    float* sm_o = reinterpret_cast<float*>(sm);                  // [CW][8][D]
    float* sm_ml = sm_o + CW * 8 * D;                             // [CW][8][2]: m (log2), l
    if (warp < CW) {
        float* r0 = sm_o + (warp * 8 + 2 * tig) * D;
        float* r1 = r0 + D;
#pragma unroll
        for (int i = 0; i < NQ; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                // dims of MMA (i, j): rows gid -> 32 i + 8 (gid >> 1) + 2 (2 j) + (gid & 1), rows
                // gid + 8 -> the same with word 2 j + 1
                const int d0 = 32 * i + 8 * (gid >> 1) + 4 * j + (gid & 1), d1 = d0 + 2;
                r0[d0] = o[i][j][0]; r1[d0] = o[i][j][1];
                r0[d1] = o[i][j][2]; r1[d1] = o[i][j][3];
            }
        if (gid == 0) {
            float* ml = sm_ml + (warp * 8 + 2 * tig) * 2;
            ml[0] = ma == NEG_INF ? NEG_INF : ma * scale_log2; ml[1] = la;
            ml[2] = mb == NEG_INF ? NEG_INF : mb * scale_log2; ml[3] = lb;
        }
    }
    __syncthreads();
    constexpr int R = HPC * GROUP;  // output rows of this CTA: row0 .. row0 + R - 1
    const long long row0 = (long long)item * num_q_heads + hc * R;
    for (int idx = tid; idx < R * D; idx += NT) {
        const int r = idx / D, d = idx % D;
        const int hh = r / GROUP, g = r % GROUP;
        const int n = (hh & 1) * 4 + g, w0 = (hh >> 1) * WPP;  // the pair's column and warps
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < WPP; ++w) mx = fmaxf(mx, sm_ml[((w0 + w) * 8 + n) * 2]);
        float lsum = 0.f, acc = 0.f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int w = 0; w < WPP; ++w) {
                const float* ml = sm_ml + ((w0 + w) * 8 + n) * 2;
                const float wt = ml[0] == NEG_INF ? 0.f : exp2f(ml[0] - mx);
                lsum += ml[1] * wt;
                acc += sm_o[((w0 + w) * 8 + n) * D + d] * wt;
            }
        }
        const long long row = row0 + r;
        const float res = lsum > 0.f ? acc / lsum : 0.f;
        if (parts == 0) {
            out[row * D + d] = from_float(res);
        } else {
            part_o[(row * parts + split) * D + d] = res;
            if (d == 0) part_lse[row * parts + split] = lsum > 0.f ? mx + __log2f(lsum) : NEG_INF;
        }
    }
}
