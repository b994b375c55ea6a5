"""GQA groups on the attention planners, on the CPU: any count up to 16 query heads a kv
head in the decode kernel's M tile and the multi-token and cascade tiles; past 16, decode in
chunks of 16 heads (one CTA a kv head, its chunks' warps sharing each K/V tile, heads wider
than 256 a CTA a chunk); what the kernels cannot hold refused by name before any GPU is
asked. (Split from test_kernel_plans.py.)"""

from __future__ import annotations

import pytest
from kernel_plan_helpers import NSM, spec_of

from kvpager import KernelConfig, UnsupportedConfiguration
from kvpager.backends.cupy_cascade import cascade_tiling
from kvpager.backends.cupy_decode import decode_shape
from kvpager.backends.cupy_prefill import prefill_tiling
from kvpager.kernel_config import DEFAULT


@pytest.mark.parametrize("group", [3, 5, 6, 7, 9, 12, 14, 16])
def test_groups_up_to_sixteen_plan_on_every_kernel(group):
    """A group of any count up to 16 query heads a kv head: the decode kernel's M tile holds
    it (GROUP), and the multi-token and cascade tiles hold its whole query tokens (rows past
    them pad: bm // group tokens a tile)."""
    from kvpager.kernels import check_group

    assert check_group(4 * group, 4) == group
    spec = spec_of("bfloat16", None, 128, 16, 4)
    shape = decode_shape(spec, group, 64, 4096, NSM, DEFAULT)
    assert shape.tc and shape.defines["GROUP"] == group
    t, defs, _ = prefill_tiling(spec, group, DEFAULT)
    assert defs["GROUP"] == group and t.bm // group >= 1
    ct, _, members = cascade_tiling(spec, group, DEFAULT)
    assert members == ct.bm // group and members * group <= ct.bm


@pytest.mark.parametrize("group, kv_heads, head_dim, chunks", [(71, 1, 64, 5), (29, 8, 64, 2), (48, 1, 128, 3),
                                                                (128, 1, 128, 8), (71, 1, 128, 5), (128, 1, 64, 8),
                                                                (17, 2, 256, 2), (48, 1, 256, 3), (20, 1, 512, 2)])
def test_groups_past_sixteen_decode_in_chunks_of_sixteen(group, kv_heads, head_dim, chunks):
    """Falcon-7B's 71 query heads over one kv head, Falcon-180B's 29, StarCoder's 48: the
    decode kernel's M tile takes 16 of them, so each kv head's group is cut into chunks of
    16 heads, one kv head a CTA whatever the short-context layout or the config asks. Up to
    head dim 256 the chunks run in one CTA, WPH warps each and 16 warps at most, sharing
    their stages (a set a place); wider heads (two warps a tile) take a CTA a chunk. The
    multi-token tiles hold chunks of the group's heads (`head_chunk`)."""
    spec = spec_of("bfloat16", None, head_dim, 16, kv_heads)
    wide = head_dim > 256
    for max_len, config in ((4096, DEFAULT), (256, DEFAULT), (4096, KernelConfig(decode_heads_per_cta=4)),
                            (4096, KernelConfig(decode_warps_per_head=4))):
        shape = decode_shape(spec, group, 64, max_len, NSM, config)
        assert shape.tc and shape.defines["GROUP"] == group and shape.defines["HPC"] == 1
        wph = shape.defines["WPH"]
        if wide:
            assert shape.ctas == 64 * kv_heads * chunks and shape.threads == 64 * wph
        else:
            most = 16 if head_dim <= 96 else 12 if head_dim <= 128 else 8  # warps without spills
            assert shape.ctas == 64 * kv_heads and shape.threads == 32 * chunks * wph <= 32 * most
            assert wph == max(1, min(4, most // chunks))
            stage = 2 * 16 * head_dim * 2
            assert shape.smem == max(wph * shape.defines["STAGES"] * stage + 128, chunks * wph * 16 * head_dim * 4)
    t, defs, _ = prefill_tiling(spec, group, DEFAULT)
    hch = defs.get("HCH", group)
    assert defs["GROUP"] == group and 1 <= hch <= t.bm
    assert rows_used(group, t.bm, hch) >= rows_used(group, t.bm, min(group, t.bm)) > 0


def test_groups_past_the_multi_token_tiles_run_in_head_chunks():
    """A group larger than the multi-token kernel's tiles (64 rows at head dims past 128 on
    mma.sync) runs in chunks of its heads (HCH), where it was refused before; the shared-prefix
    kernel, whose tiles hold whole members, still refuses it by name, so such a step does not
    cascade (the decode kernel takes any group)."""
    from kvpager.backends.cupy_cascade import cascade_holds, cascade_kernel
    from kvpager.backends.cupy_prefill import prefill_kernel

    spec = spec_of("bfloat16", None, 192, 16, 1)
    k = prefill_kernel(spec, 71, DEFAULT, (8, 0))
    assert (k.file, k.tiling.bm, k.defines["GROUP"], k.head_chunk(71)) == ("paged_prefill.cu", 64, 71, 8)
    assert prefill_kernel(spec, 64, DEFAULT, (8, 0)).head_chunk(64) == 64  # a token a tile, every row used
    with pytest.raises(UnsupportedConfiguration, match="group of 71 query heads exceeds .* 64-row tiles"):
        cascade_kernel(spec, 71, DEFAULT, (8, 0))
    assert not cascade_holds(spec, 71, DEFAULT, (8, 0)) and cascade_holds(spec, 64, DEFAULT, (8, 0))
    # on Hopper the wgmma kernel's 128 rows hold it; its cascade twin takes whole members, no chunks
    wide = spec_of("bfloat16", None, 128, 16, 1)
    k = prefill_kernel(wide, 71, DEFAULT, (9, 0))
    assert k.file == "paged_prefill_sm90.cu" and k.defines["HCH"] == 8
    c = cascade_kernel(wide, 71, DEFAULT, (9, 0))
    assert c.file == "cascade_prefix_sm90.cu" and "HCH" not in c.defines and cascade_holds(wide, 71, DEFAULT, (9, 0))
    # one warpgroup (64 rows) on Hopper: the prefill still runs there in chunks; the cascade
    # moves to cascade_prefix.cu, whose 128 rows hold the group
    one = DEFAULT.replace(prefill_wgmma_warpgroups=1, prefill_wgmma_producer=False)
    assert prefill_kernel(wide, 71, one, (9, 0)).tiling.bm == 64
    assert cascade_kernel(wide, 71, one, (9, 0)).file == "cascade_prefix.cu"


def rows_used(group: int, rows: int, chunk: int) -> float:
    """The share of the rows of a kv head's tiles over a run of tokens that hold a query head,
    counted over the explicit (token, head) grid of tiles of ``chunk`` heads: what `head_chunk`
    is to maximise, independently of its formula."""
    per_tile = rows // chunk
    tokens = per_tile * 5  # a run of whole tiles
    tiles = held = 0
    for c0 in range(0, group, chunk):
        heads = min(chunk, group - c0)
        for _ in range(0, tokens, per_tile):
            tiles += 1
            held += per_tile * heads
    assert held == tokens * group  # every (token, head) pair in exactly one tile row
    return held / (tiles * rows)


@pytest.mark.parametrize("rows", [64, 128])
def test_head_chunks_waste_the_fewest_rows(rows):
    """`head_chunk`: the whole group up to 16 heads; past 16 the chunk of 8 heads or more
    whose tiles hold the most query heads a row (counted over an explicit grid of tiles), the
    largest of equals."""
    from kvpager.backends.prefill_work import head_chunk

    for group in range(1, 129):
        h = head_chunk(group, rows)
        assert 1 <= h <= min(group, rows)
        if group <= 16:
            assert h == group
            continue
        assert h >= 8
        best = max(rows_used(group, rows, c) for c in range(8, min(group, rows) + 1))
        assert rows_used(group, rows, h) == pytest.approx(best)
        assert all(rows_used(group, rows, c) < best - 1e-12 for c in range(h + 1, min(group, rows) + 1))
    # Falcon-7B's 71: 9 chunks of 8 heads, 16 tokens a 128-row tile (71 of 72 heads' rows)
    assert head_chunk(71, 128) == 8 and rows_used(71, 128, 8) == pytest.approx(71 / 72)
    assert head_chunk(48, 128) == 16  # StarCoder: 3 chunks, every row used
    # a config's chunk, cut to the group and the rows
    assert head_chunk(7, 128, 3) == 3 and head_chunk(7, 128, 99) == 7 and head_chunk(200, 64, 99) == 64


def test_head_chunk_knob_reaches_both_kernels():
    from kvpager.backends.cupy_prefill import prefill_kernel

    spec = spec_of("bfloat16", None, 128, 16, 2)
    for cc in ((8, 0), (9, 0)):
        assert "HCH" not in prefill_kernel(spec, 7, DEFAULT, cc).defines
        assert prefill_kernel(spec, 7, DEFAULT.replace(prefill_head_chunk=3), cc).defines["HCH"] == 3
        assert "HCH" not in prefill_kernel(spec, 7, DEFAULT.replace(prefill_head_chunk=7), cc).defines
    with pytest.raises(Exception, match="prefill_head_chunk"):
        KernelConfig(prefill_head_chunk=0)


@pytest.mark.parametrize("heads, kv_heads", [(258, 2), (129, 1), (10, 4), (7, 2)])
def test_groups_the_kernels_do_not_hold_are_refused_by_name(heads, kv_heads):
    """Past 128 query heads a kv head, or query heads not a multiple of the kv heads: a
    typed error naming the counts, before any GPU is asked."""
    from kvpager.kernels import check_group

    with pytest.raises(UnsupportedConfiguration, match=f"got {heads} query heads over {kv_heads} kv heads"):
        check_group(heads, kv_heads)
