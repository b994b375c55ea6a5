// paged_prefill_sm90.cu: multi-token paged attention (prefill, chunked prefill on
// top of a cached prefix) on Hopper's warpgroup MMA (wgmma, sm_90a only),
// float16 / bfloat16 pools, float32 accumulate. Same signature, semantics and
// tiles list as paged_prefill.cu (read its header for the causal rule, the GQA
// rows, window, soft cap, own_start and the cascade's partial states); FP8
// pools and other head dims use paged_prefill.cu.
//
// A CTA owns a query tile of BM = 64 * WG rows (row r: query token j0 + r /
// GROUP, query head kv_head * GROUP + r % GROUP), one warpgroup (4 warps) per
// 64 rows. All its threads gather the sequence's K/V tiles of BN positions
// through the block table with cp.async (16 bytes, rows outside the visible
// range zero-filled) into shared memory in wgmma's 128-byte-swizzled layout
// (kvpager_wgmma.cuh), STAGES deep. Each warpgroup computes S = Q K^T with Q and
// K from shared memory (K token-major: the K-major B operand), the online
// softmax (exp2) on the accumulator registers, and O += P V with P from
// registers (the A fragment) and V from shared memory (token-major: the
// MN-major, transposed B operand). WS=1 (warp specialisation, FA3 style): a
// third, producer warpgroup does all the copies (setmaxnreg gives its registers
// to the two MMA warpgroups) and hands each stage over through mbarriers, full
// (its copies landed) and empty (both warpgroups' MMAs on it done), so the
// warpgroups never wait on one another. OVERLAP=1: S of tile t + 1 is issued before
// the softmax of tile t, which then runs while the tensor cores work (two
// tiles resident, so the copies run STAGES - 2 tiles ahead).
//
// Grid: x = query tile, y = kv head; NT = 128 * WG threads (+ 128 with WS).
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
#define VN HEAD_DIM  // N of one O += P V instruction: HEAD_DIM (one), or 64 (one per 64 dims)
#endif
#ifndef OVERLAP
#define OVERLAP 0  // 1: S of the next K/V tile runs during this tile's softmax (STAGES >= 3)
#endif
#ifndef WS
#define WS 0  // 1: a producer warpgroup copies K/V, the other two only compute (mbarriers, no CTA barrier)
#endif

#if KV_DTYPE == 2 || KV_FP8
#error "paged_prefill_sm90.cu is for float16 / bfloat16 pools; FP8 and float32 use paged_prefill.cu / paged_decode.cu"
#endif
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(__CUDACC_RTC__)
#error "paged_prefill_sm90.cu needs the sm_90a target (wgmma)"
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
constexpr int QT = BM / GROUP;          // query tokens per tile
constexpr int CPR = D / 8;              // 16-byte chunks per row
constexpr int KV_TILE = BN * D * 2;     // bytes of one K or V tile
static_assert(D == 64 || D == 128, "paged_prefill_sm90.cu takes head dims 64 and 128");
static_assert(BN == 64 || BN == 128, "BN is 64 or 128");
static_assert(WG == 1 || WG == 2, "WG is 1 or 2");
static_assert(VN == D || VN == 64, "VN is HEAD_DIM or 64");
static_assert(!OVERLAP || STAGES >= 3, "OVERLAP keeps two tiles resident: STAGES >= 3");
static_assert(!WS || WG == 2, "WS: two consumer warpgroups and a producer warpgroup");
static_assert(BM % GROUP == 0, "a tile holds whole query tokens");

extern "C" __global__ void __launch_bounds__(NT, 1) paged_prefill_sm90(
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
    const float* __restrict__ kv_scales,    // unused (16-bit pools only; the signature is paged_prefill's)
    int window, float softcap, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const unsigned raw_addr = smem_addr(smem_raw);
    const unsigned base = (raw_addr + 1023u) & ~1023u;  // regions on 1024-byte boundaries
    unsigned char* sbase = smem_raw + (base - raw_addr);
    unsigned char* Qs = sbase;                          // SW128 [BM rows]
    unsigned char* Ks = Qs + BM * D * 2;                // SW128 [STAGES][BN rows]
    unsigned char* Vs = Ks + STAGES * KV_TILE;          // SW128 [STAGES][BN rows]
    const unsigned q_addr = base, k_addr = base + BM * D * 2, v_addr = k_addr + STAGES * KV_TILE;

    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, wwarp = (tid >> 5) & 3;   // warpgroup, warp within it
    const int gid = lane >> 2, tig = lane & 3;
    const int b = tiles[2 * blockIdx.x], j0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int num_q_heads = num_kv_heads * GROUP;
    const int seq_len = seq_lens[b], qlen = query_lens[b];
    const int qpos0 = seq_len - qlen;          // position of query token 0
    const long long qrow0 = q_start[b];
    const int last_tok = min(j0 + QT, qlen) - 1;
    const int kv_end = qpos0 + last_tok + 1;   // K/V positions this tile can see
    const int num_tiles = (kv_end + BN - 1) / BN;
    const int first_pos = qpos0 + j0;
    const int last_pos = qpos0 + last_tok;
    const int own = own_start != nullptr ? own_start[b] : 0;
    const int first_vis = max(own, window > 0 ? max(0, first_pos - window + 1) : 0);
    const int t_begin = first_vis / BN;
    const int win_edge = window > 0 ? last_pos - window : -1;

    const int* table = block_tables + (long long)b * max_blocks;
    const long long block_stride = (long long)num_layers * 2 * num_kv_heads * BLOCK_SIZE * D;
    const long long k_off = ((long long)layer * 2 * num_kv_heads + h) * BLOCK_SIZE * D;
    const long long v_off = k_off + (long long)num_kv_heads * BLOCK_SIZE * D;

    // Q tile -> smem (rows past the sequence's queries zero-filled), by the consumer threads.
    if (tid < NC) for (int c = tid; c < BM * CPR; c += NC) {
        const int r = c / CPR, ch = c % CPR;
        const int tok = j0 + r / GROUP;
        const bool ok = tok < qlen;
        const kv_t* src = ok ? q + ((qrow0 + tok) * num_q_heads + h * GROUP + r % GROUP) * D + ch * 8 : q;
        cp_async16(Qs + sw128_offset(BM, r, ch), src, ok);
    }
    // K/V tile t -> stage, copied by ``n`` threads of which this is number ``me`` (``n`` is a
    // constant at every call: the lambda is inlined; not a generic lambda, which NVRTC 13.0 refuses).
    auto load_kv = [&](int t, int stage, int me, int n) {
        unsigned char* ks = Ks + stage * KV_TILE;
        unsigned char* vs = Vs + stage * KV_TILE;
#pragma unroll 4
        for (int c = me; c < BN * CPR; c += n) {
            const int r = c / CPR, ch = c % CPR;
            const int pos = t * BN + r;
            const bool ok = pos < kv_end && pos >= first_vis;  // zero-filled outside
            long long row = 0;
            if (ok) row = (long long)table[pos / BLOCK_SIZE] * block_stride + (pos % BLOCK_SIZE) * D + ch * 8;
            const int off = sw128_offset(BN, r, ch);
            cp_async16(ks + off, pool + (ok ? row + k_off : 0), ok);
            cp_async16(vs + off, pool + (ok ? row + v_off : 0), ok);
        }
    };
#if !WS
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < num_tiles) load_kv(t_begin + s, s, tid, NT);
        cp_commit();  // the first group also holds the Q tile
    }
#else
    // Stage s is full (128 producer arrivals: each thread's copies landed and fenced for the
    // async proxy) and empty (NC consumer arrivals: its last reader's MMAs done).
    __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(smem_addr(&full_bar[s]), NT - NC);
            mbar_init(smem_addr(&empty_bar[s]), NC);
        }
    }
    __syncthreads();
    if (tid >= NC) {  // the producer warpgroup; each thread signals a tile once the next is under way
        setmaxnreg_dec<PRODUCER_REGS>();
        int i = 0;
        for (int t = t_begin; t < num_tiles; ++t, ++i) {
            const int stage = i % STAGES;
            if (i >= STAGES) mbar_wait(smem_addr(&empty_bar[stage]), ((i / STAGES) - 1) & 1);
            load_kv(t, stage, tid - NC, NT - NC);
            cp_commit();
            if (i > 0) {
                cp_wait<1>();
                fence_proxy_async();
                mbar_arrive(smem_addr(&full_bar[(i - 1) % STAGES]));
            }
        }
        if (i > 0) {
            cp_wait<0>();
            fence_proxy_async();
            mbar_arrive(smem_addr(&full_bar[(i - 1) % STAGES]));
        }
        return;
    }
    setmaxnreg_inc<CONSUMER_REGS>();
    cp_commit();
    cp_wait<0>();  // the Q tile
    fence_proxy_async();
    named_barrier_sync(1, NC);
#endif

    float o[D / 2];   // m64nD accumulator: n8 block n holds (gid, 8n + 2 tig + {0,1}), (gid + 8, ...)
    float m[2], l[2];
    int p[2];         // query position of this thread's two rows (-1: padding row)
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        m[hf] = NEG_INF;
        l[hf] = 0.f;
        const int tok = j0 + (wg * 64 + wwarp * 16 + gid + 8 * hf) / GROUP;
        p[hf] = tok < qlen ? qpos0 + tok : -1;
    }
    // This warpgroup's 64 Q rows: K-major A operand, SBO 1024 (8-row groups).
    const unsigned q_wg = q_addr + wg * 64 * 128;

    // S = Q K^T of the K tile at k_st (issued and committed, not waited for): D / 16 k-steps,
    // k-step kk is +32 bytes within a 64-value region.
    auto issue_s = [&](float* s, unsigned k_st) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned qa = q_wg + (kk >> 2) * BM * 128 + (kk & 3) * 32;
            const unsigned ka = k_st + (kk >> 2) * BN * 128 + (kk & 3) * 32;
            wgmma_ss<BN>(s, sw128_desc(qa, 16, 1024), sw128_desc(ka, 16, 1024), kk > 0);
        }
        wgmma_commit();
    };
    // Soft cap, masks and the online softmax of tile t's scores s, then O += P V with the V
    // tile at v_st (issued and committed, not waited for).
    auto softmax_pv = [&](float* s, int t, unsigned v_st) {
        if (softcap > 0.f) {
            const float inv = 1.f / softcap;
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) s[i] = softcap * tanhf(s[i] * inv);
        }
        // Causal and padding mask, only on tiles that reach past the tile's first query;
        // the own part's start and the window's edge, only on the tiles that hold them.
        if ((t + 1) * BN - 1 > first_pos) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = t * BN + n * 8 + tig * 2 + e;
                    if (kp > p[0]) s[4 * n + e] = NEG_INF;
                    if (kp > p[1]) s[4 * n + 2 + e] = NEG_INF;
                }
        }
        if (t * BN < own) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = t * BN + n * 8 + tig * 2 + e;
                    if (kp < own) { s[4 * n + e] = NEG_INF; s[4 * n + 2 + e] = NEG_INF; }
                }
        }
        if (t * BN <= win_edge) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = t * BN + n * 8 + tig * 2 + e;
                    if (kp <= p[0] - window) s[4 * n + e] = NEG_INF;
                    if (kp <= p[1] - window) s[4 * n + 2 + e] = NEG_INF;
                }
        }
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
        const float u0 = mx0 == NEG_INF ? 0.f : mx0 * scale_log2;
        const float u1 = mx1 == NEG_INF ? 0.f : mx1 * scale_log2;
        const float c0 = exp2f(m[0] * scale_log2 - u0), c1 = exp2f(m[1] * scale_log2 - u1);
        m[0] = mx0; m[1] = mx1;
        l[0] *= c0; l[1] *= c1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[4 * n] *= c0; o[4 * n + 1] *= c0; o[4 * n + 2] *= c1; o[4 * n + 3] *= c1;
        }
        // P = exp2(S * scale - m * scale), packed into A fragments (16 positions per k-step).
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            const float e0 = exp2f(fmaf(s[4 * n], scale_log2, -u0));
            const float e1 = exp2f(fmaf(s[4 * n + 1], scale_log2, -u0));
            const float e2 = exp2f(fmaf(s[4 * n + 2], scale_log2, -u1));
            const float e3 = exp2f(fmaf(s[4 * n + 3], scale_log2, -u1));
            l[0] += e0 + e1; l[1] += e2 + e3;
            pa[n >> 1][(n & 1) * 2 + 0] = pack2(e0, e1);
            pa[n >> 1][(n & 1) * 2 + 1] = pack2(e2, e3);
        }
        // O += P V: BN / 16 k-steps of 16 positions (+2048 bytes each); N = VN values per
        // instruction, LBO = a region (the next 64 dims), SBO 1024 (the next 8 positions).
        fence_regs<D / 2>(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int c = 0; c < D / VN; ++c)
                wgmma_rs<VN>(o + c * (VN / 2), pa[kk], sw128_desc(v_st + c * BN * 128 + kk * 2048, BN * 128, 1024));
        wgmma_commit();
    };

    int st = 0;  // the stage of tile t
#if WS && OVERLAP
    float s[BN / 2], sn[BN / 2];
    if (t_begin < num_tiles) {
        mbar_wait(smem_addr(&full_bar[0]), 0);
        issue_s(s, k_addr);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
    }
    for (int t = t_begin, i = 0; t < num_tiles; ++t, ++i) {
        const int nst = st + 1 == STAGES ? 0 : st + 1;
        const bool more = t + 1 < num_tiles;
        if (more) {
            mbar_wait(smem_addr(&full_bar[nst]), ((i + 1) / STAGES) & 1);
            issue_s(sn, k_addr + nst * KV_TILE);
        }
        softmax_pv(s, t, v_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        fence_regs<BN / 2>(sn);
        mbar_arrive(smem_addr(&empty_bar[st]));  // K (read last iteration) and V of tile t done
        if (more) {
#pragma unroll
            for (int k = 0; k < BN / 2; ++k) s[k] = sn[k];
        }
        st = nst;
    }
#elif WS
    for (int t = t_begin, i = 0; t < num_tiles; ++t, ++i) {
        mbar_wait(smem_addr(&full_bar[st]), (i / STAGES) & 1);
        float s[BN / 2];
        issue_s(s, k_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
        softmax_pv(s, t, v_addr + st * KV_TILE);
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
        issue_s(s, k_addr);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
    }
    for (int t = t_begin; t < num_tiles; ++t) {
        const int nst = st + 1 == STAGES ? 0 : st + 1;
        cp_wait<STAGES - 3>();  // tile t + 1 landed
        fence_proxy_async();
        __syncthreads();        // ... for every thread; and tile t - 1's stage is read by no one
        if (t + STAGES - 1 < num_tiles) load_kv(t + STAGES - 1, st == 0 ? STAGES - 1 : st - 1, tid, NT);
        cp_commit();
        const bool more = t + 1 < num_tiles;
        if (more) issue_s(sn, k_addr + nst * KV_TILE);
        softmax_pv(s, t, v_addr + st * KV_TILE);
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
        if (t + STAGES - 1 < num_tiles) load_kv(t + STAGES - 1, st == 0 ? STAGES - 1 : st - 1, tid, NT);
        cp_commit();
        cp_wait<STAGES - 1>();
        fence_proxy_async();  // this thread's landed copies -> visible to wgmma
        __syncthreads();
        float s[BN / 2];
        issue_s(s, k_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<BN / 2>(s);
        softmax_pv(s, t, v_addr + st * KV_TILE);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        __syncthreads();  // this stage is refilled STAGES - 1 iterations later
        st = st + 1 == STAGES ? 0 : st + 1;
    }
#endif
    cp_wait<0>();

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float lt = l[hf];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        if (p[hf] < 0) continue;
        const int r = wg * 64 + wwarp * 16 + gid + 8 * hf;
        const long long orow = (qrow0 + j0 + r / GROUP) * num_q_heads + h * GROUP + r % GROUP;
        if (parts > 0) {  // a cascade's own part: slot 0, the segments' slots empty until filled
            float2* dst = reinterpret_cast<float2*>(part_o + orow * parts * D) + tig;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                dst[n * 4] = make_float2(o[4 * n + 2 * hf] * inv, o[4 * n + 2 * hf + 1] * inv);
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
}
