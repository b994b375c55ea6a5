"""BlockTable: rows of block ids; batch add / copy / release, columns, gather."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager.block_table import BlockTable


def test_rows_grow_and_gather_pads_with_the_null_block():
    bt = BlockTable(rows=2, width=2, columns=["owner"])
    a = bt.add_row([5, 6, 7], 40)
    rows = bt.add_rows(np.array([1, 2, 3]), np.array([1, 2]), np.array([9, 20]))
    assert bt.num_live == 3 and bt.width >= 3
    tables, lens = bt.gather([a, *rows.tolist()])
    assert tables.tolist() == [[5, 6, 7], [1, 0, 0], [2, 3, 0]] and lens.tolist() == [40, 9, 20]
    assert tables.dtype == np.int32 and lens.dtype == np.int32
    bt.owner[rows] = [4, 5]
    kids = bt.copy_rows(np.array([rows[1], rows[1], a]))
    assert bt.gather(kids)[0].tolist() == [[2, 3, 0], [2, 3, 0], [5, 6, 7]]
    assert bt.owner[kids].tolist() == [5, 5, 0]
    assert bt.row_blocks(np.array([a, rows[1]]), reverse=True).tolist() == [7, 6, 5, 3, 2]
    bt.release_rows(kids)
    bt.release_rows([a])
    assert bt.num_live == 2 and bt.owner[kids].tolist() == [0, 0, 0]
    bt.check(rows)
    assert bt.references(10).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_distinct_and_column_names():
    bt = BlockTable(columns=["seq_id"])
    assert bt.distinct(np.array([3, 1, 2])) and not bt.distinct(np.array([3, 1, 3]))
    with pytest.raises(ValueError, match="taken"):
        BlockTable(columns=["table"])


def test_whole_row_threshold_follows_the_width():
    """`whole_from`: the fewest blocks for which a row is copied whole, i.e. the
    table at most twice (+16) as wide as the row's used part; kept as the
    table widens."""
    bt = BlockTable(rows=2, width=1)
    for width in [1, 2, 15, 16, 17, 18, 19, 40, 41, 100, 257, 1000]:
        bt.reserve_width(width)
        w = bt.table.shape[1]
        assert bt.whole_from == next(nb for nb in range(w + 1) if w <= 2 * nb + 16), w


def test_a_large_table_gives_memory_back_as_its_rows_go(monkeypatch):
    """Rows and width only grew: a burst of sequences beside one long one left
    the table at its largest for good (766 MiB kept by a daemon after its
    sessions freed everything). Past SHRINK_FROM bytes, once an eighth of its
    rows went, it drops rows past the last held one and columns past twice
    the widest; held rows keep their indices and contents."""
    from kvpager import block_table

    monkeypatch.setattr(block_table, "SHRINK_FROM", 1 << 16)
    bt = BlockTable(columns=["owner"])
    rows = [bt.add_row(np.arange(1, 4), 40) for _ in range(3000)]
    wide = bt.add_row(np.arange(1, 2001), 32000)
    keep = rows[:10]
    bt.owner[keep] = 7
    assert bt.table.nbytes >= 3000 * 2000 * 4
    bt.release_row(wide)
    bt.release_rows(np.array(rows[10:], dtype=np.int64))
    assert bt.table.shape[0] <= 64 and bt.width <= 16
    assert [bt.blocks(r).tolist() for r in keep] == [[1, 2, 3]] * 10
    assert list(bt.num_tokens[keep]) == [40] * 10 and list(bt.owner[keep]) == [7] * 10
    new = [bt.add_row(np.arange(5, 9), 60) for _ in range(100)]  # grows again from there
    assert not set(new) & set(keep) and all(bt.blocks(r).tolist() == [5, 6, 7, 8] for r in new)
    assert [bt.blocks(r).tolist() for r in keep] == [[1, 2, 3]] * 10


@pytest.mark.parametrize("order", ["last first", "first first"])
def test_a_shrunk_table_lets_go_of_its_old_arrays_whatever_order_rows_go_in(order, monkeypatch):
    """A shrink that kept every column sliced rows as a view (the old array kept
    alive under a smaller shape), and rows freed in the order they were made
    were checked only while the last ones still lived (never after)."""
    from kvpager import block_table

    monkeypatch.setattr(block_table, "SHRINK_FROM", 1 << 16)
    bt = BlockTable(columns=["owner"])
    wide = bt.add_row(np.arange(1, 1025), 16000)
    rows = [bt.add_row(np.array([5]), 9) for _ in range(4000)]
    big = bt.table.nbytes
    batches = [rows[i:i + 256] for i in range(0, len(rows), 256)]
    for batch in (batches[::-1] if order == "last first" else batches):
        bt.release_rows(np.array(batch[::-1] if order == "last first" else batch, dtype=np.int64))
    assert bt.table.nbytes * 8 < big and bt.table.base is None and bt.row_data.base is None
    assert bt.blocks(wide).tolist() == list(range(1, 1025)) and bt.num_tokens[wide] == 16000
