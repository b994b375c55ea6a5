// kvpager_cascade.cuh: a cascade kernel's query tile (cascade_prefix.cu,
// cascade_prefix_sm90.cu): the segment it attends and its member rows.
//
// tiles: int32 [num_tiles, 2] = (segment, first member; segment -1: an unused
// tile of a launch sized for more); segments: int32 [num_segments, 6] = (table
// row, kv_start, kv_end, first member row in members, member count, slot);
// members: the member rows' indices in q (query token rows).
#pragma once

struct CascadeTile {
    const int* table;   // the table row the segment's K/V are read through
    const int* mem;     // the segment's member rows (indices in q)
    int kv_start;       // the segment's positions [kv_start, kv_end)
    int kv_end;
    int count;          // its member rows
    int slot;           // the partial slot its rows write
    int j0;             // the tile's first member
};

// The tile of CTA ``x``; false where it is unused (the CTA exits).
__device__ __forceinline__ bool cascade_tile(int x, const int* __restrict__ tiles, const int* __restrict__ segments,
                                             const int* __restrict__ members, const int* __restrict__ block_tables,
                                             int max_blocks, CascadeTile& ct) {
    const int sg = tiles[2 * x];
    if (sg < 0) return false;
    const int* seg = segments + 6 * sg;
    ct.table = block_tables + (long long)seg[0] * max_blocks;
    ct.mem = members + seg[3];
    ct.kv_start = seg[1];
    ct.kv_end = seg[2];
    ct.count = seg[4];
    ct.slot = seg[5];
    ct.j0 = tiles[2 * x + 1];
    return true;
}

// The row of q (and of the partial outputs) of query head ``qh`` of member ``mb``.
__device__ __forceinline__ long long cascade_row(const CascadeTile& ct, int mb, int num_q_heads, int qh) {
    return (long long)ct.mem[mb] * num_q_heads + qh;
}
