"""Text renderings of what `KVPool` / `Client` return: tables for people, dicts for JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kvpager.types import (
    BlockMap,
    PinInfo,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    SessionInfo,
    TenantUsage,
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table; numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def stats_text(st: PoolStats) -> str:
    """The pool at a glance."""
    bpb = st.bytes_per_block

    def blocks(n: int) -> tuple[object, ...]:
        share = f"{100 * n / st.total_blocks:.1f}%" if st.total_blocks else "-"
        return (n, share, human_bytes(n * bpb))

    rows = [
        ("used", *blocks(st.used_blocks)),
        ("  shared (ref > 1)", *blocks(st.shared_blocks)),
        (f"  pinned (max {st.max_pinned_blocks})", *blocks(st.pinned_blocks)),
        ("evictable (cached)", *blocks(st.evictable_blocks)),
        ("free", *blocks(st.free_blocks)),
        ("total", *blocks(st.total_blocks)),
        ("host free / total", f"{st.host_free_blocks} / {st.host_total_blocks}", "", human_bytes(st.host_total_blocks * bpb)),
    ]
    lines = [
        table(("blocks", "count", "share", "bytes"), rows),
        "",
        f"sequences        {st.num_sequences} ({st.swapped_sequences} swapped)",
        f"prefix hit rate  {100 * st.prefix_hit_rate:.1f}% ({st.prefix_hit_tokens} of {st.prefix_query_tokens} prompt tokens)",
        f"slot utilization {100 * st.slot_utilization:.1f}% ({st.tokens_stored} tokens in {st.token_slots_allocated} slots)"
        if st.token_slots_allocated else "slot utilization -  (no slots allocated)",
        f"cached blocks    {st.cached_blocks}    block size {st.block_size} tokens, {human_bytes(bpb)} per block",
    ]
    if st.ranks > 1:
        per = st.bytes_per_block_per_rank
        lines.append(f"tensor-parallel  {st.ranks} ranks: each holds {human_bytes(per)} per block, "
                     f"{human_bytes(per * st.total_blocks)} of device blocks")
    return "\n".join(lines)


def remote_text(rs: RemoteStats) -> str:
    """The remote prefix tier's counters."""
    state = "available" if rs.available else "unavailable (lookups skipped until a retry succeeds)"
    return "\n".join([
        f"remote store     {rs.store}: {state}",
        f"  lookups        {rs.lookups} ({rs.lookup_blocks} blocks asked, {rs.hit_blocks} found), "
        f"{rs.skipped_lookups} skipped",
        f"  probes         {rs.probes} ({rs.probe_blocks} blocks asked, {rs.probe_hit_blocks} held), "
        f"{rs.skipped_probes} skipped",
        f"  restored       {rs.restored_blocks} blocks ({human_bytes(rs.restored_bytes)})",
        f"  written        {rs.written_blocks} blocks ({human_bytes(rs.written_bytes)}), {rs.queued_blocks} queued, "
        f"{rs.dropped_blocks} dropped",
        f"  errors         {rs.errors} failed calls, {rs.corrupt_blocks} corrupt blocks refused",
        *([f"  store losses   {rs.store_losses} (blocks the store lost; {rs.republished_blocks} cached here "
           "written again)"] if rs.store_losses else []),
    ])


def sequences_text(seqs: Sequence[SequenceInfo], max_table: int = 12) -> str:
    if not seqs:
        return "no sequences"
    rows = []
    for s in seqs:
        tbl = " ".join(map(str, s.block_table[:max_table])) + (" ..." if len(s.block_table) > max_table else "")
        pid = "-" if s.owner_pid is None else s.owner_pid
        rows.append((s.seq_id, s.owner or "-", pid, s.num_tokens, len(s.block_table), s.shared_blocks, s.state, tbl))
    return table(("seq", "session", "pid", "tokens", "blocks", "shared", "state", "block table"), rows)


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\n``, ``\\x1b``,
    ``\\x00``, ...): a salt or client name is any session's to choose, and must not
    move the operator's cursor, forge rows or stop curses (which refuses NUL). A
    backslash is escaped too (``\\``), so two texts never print alike: a newline and
    a backslash followed by ``n`` read as two different tenants."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def salt_label(salt: str | bytes | None, width: int = 32) -> str:
    """A salt for a table cell: ``-`` for the default (None or empty), bytes as hex, a str's
    unprintable characters escaped (`printable`), cut to ``width``. A str that reads as one
    of the others (``-``, ``0x...``, or one in quotes) is quoted: a tenant salted ``"-"``
    showed as the default tenant, and ``"0xab"`` as the bytes ``b"\xab"``."""
    if not salt:
        text = "-"
    elif isinstance(salt, str):
        text = printable(salt)
        if text == "-" or text.startswith(("0x", '"')):
            text = f'"{text}"'
    else:
        text = "0x" + salt.hex()
    return text if len(text) <= width else text[: width - 3] + "..."


def tenants_text(tenants: Sequence[TenantUsage], total: int | None = None) -> str:
    """The tenants listed; ``total``: how many there are (more than listed: said)."""
    if not tenants:
        return "no cached blocks and no quotas"
    rows = [(salt_label(t.salt), t.cached_blocks, t.evictable_blocks, t.pinned_blocks,
             "-" if t.quota is None else t.quota, "over" if t.over_quota else "") for t in tenants]
    text = table(("tenant (salt)", "cached", "evictable", "pinned", "quota", ""), rows)
    if total is not None and total > len(tenants):
        text += f"\n(the {len(tenants)} listed: those with a quota and the largest; {total} tenants in all)"
    return text


def pins_text(pins: Sequence[PinInfo]) -> str:
    if not pins:
        return "no pins"
    rows = [(p.owner or "daemon", salt_label(p.salt), p.num_tokens, len(p.block_table), p.count) for p in pins]
    return table(("owner", "salt", "tokens", "blocks", "count"), rows)


def sessions_text(sessions: Sequence[SessionInfo]) -> str:
    if not sessions:
        return "no sessions"
    rows = [(s.name, "-" if s.pid is None else s.pid, printable(s.client)[:40], s.sequences, s.pins, s.requests,
             f"{s.age_s:.0f}s", "yes" if s.control else "") for s in sessions]
    head = ("session", "pid", "client", "seqs", "pins", "requests", "age", "control")
    if any(s.rank is not None for s in sessions):  # (a tensor-parallel daemon's: which rank of which driver)
        rows = [(*r, "" if s.rank is None else s.rank, s.driver or "") for r, s in zip(rows, sessions)]
        head = (*head, "rank", "driver")
    return table(head, rows)


def sequence_dict(s: SequenceInfo) -> dict[str, object]:
    d = dataclasses.asdict(s)
    d["block_table"] = list(s.block_table)
    d["state"] = s.state
    return d


# One character per block: state, and for used blocks the reference count.
_GLYPH = {BlockMap.NULL: "0", BlockMap.FREE: ".", BlockMap.EVICTABLE: "c"}


def block_glyphs(bm: BlockMap) -> str:
    """``.`` free, ``c`` evictable (cached), ``#`` used by one, ``2``-``9`` / ``+`` shared
    by that many, ``0`` the null block. Shared runs read as runs of digits."""
    out = []
    for state, ref in zip(bm.state.tolist(), bm.ref_cnt.tolist()):
        if state == BlockMap.USED:
            out.append("#" if ref == 1 else str(ref) if ref < 10 else "+")
        else:
            out.append(_GLYPH[state])
    return "".join(out)


def blocks_text(bm: BlockMap, width: int = 64) -> str:
    glyphs = block_glyphs(bm)
    lines = [f"{start:>8}  {glyphs[start:start + width]}" for start in range(0, len(glyphs), width)]
    counts = {name: int((bm.state == i).sum()) for i, name in enumerate(BlockMap.STATE_NAMES)}
    shared = int((bm.ref_cnt > 1).sum())
    legend = ("legend: . free  c evictable (cached)  # used  2-9,+ shared by that many  0 null block\n"
              f"{counts['used']} used ({shared} shared), {counts['evictable']} evictable, {counts['free']} free")
    return "\n".join(lines + ["", legend])


def shared_runs(bm: BlockMap) -> list[tuple[int, int, int]]:
    """Runs of consecutive blocks with the same reference count above 1: (start, length, ref)."""
    runs = []
    refs = bm.ref_cnt.tolist()
    i = 0
    while i < len(refs):
        if refs[i] > 1:
            j = i
            while j + 1 < len(refs) and refs[j + 1] == refs[i]:
                j += 1
            runs.append((i, j - i + 1, refs[i]))
            i = j + 1
        else:
            i += 1
    return runs


def blocks_dict(bm: BlockMap) -> dict[str, object]:
    return {
        "state": [BlockMap.STATE_NAMES[s] for s in bm.state.tolist()],
        "ref_cnt": bm.ref_cnt.tolist(),
        "cached": bm.cached.tolist(),
        "shared_runs": [dict(start=s, length=n, ref=r) for s, n, r in shared_runs(bm)],
    }
