"""The markdown tables of `bench_peers.py`, from its report (the dict ``--json``
prints). Standard library only: it renders a report anywhere."""

from __future__ import annotations

# (column title, contender key in a row's results), per table
DECODE = [("kvpager", "kvpager"), ("FlashInfer", "flashinfer"), ("SDPA", "sdpa")]
SHARED = [("kvpager cascade", "kvpager cascade"), ("kvpager plain", "kvpager plain"),
          ("FlashInfer cascade", "flashinfer cascade"), ("FlashInfer paged", "flashinfer paged"),
          ("SDPA", "sdpa")]
PREFILL = [("kvpager", "kvpager"), ("FlashInfer fa2", "flashinfer fa2"),
           ("FlashInfer fa3", "flashinfer fa3"), ("SDPA", "sdpa")]


def ms(res: dict | None) -> str:
    """A contender's cell: its time, or why there is none."""
    if not res:
        return "-"
    if "ms" in res:
        return f"{res['ms']:.3f}" + (" (ran plain)" if res.get("cascades") is False else "")
    for key, word in (("absent", "absent"), ("skipped", "skipped"), ("error", "failed")):
        if key in res:
            return word
    return "-"


def ratio(peer: dict | None, ours: dict | None) -> str:
    """peer time / kvpager time, where both were timed."""
    if peer and ours and "ms" in peer and "ms" in ours:
        return f"{peer['ms'] / ours['ms']:.2f}x"
    return "-"


def errors(results: dict, keys: list[str]) -> str:
    return " / ".join(f"{results[k]['rel_err']:.1e}" if "rel_err" in results.get(k, {}) else "-"
                      for k in keys)


def rate(res: dict | None, amount: float, unit: float, digits: int = 2) -> str:
    return f"{amount / res['ms'] / unit:.{digits}f}" if res and "ms" in res else "-"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _failed_row(first: list[str], r: dict, width: int) -> list[str]:
    """A case that produced no results: its first cells, then why."""
    return first + ["skipped" if "skipped" in r else "failed"] + ["-"] * (width - len(first) - 1)


def share(res: dict | None, amount: float, peak_tbs: float | None) -> str:
    """A read's rate as a percentage of the card's datasheet bandwidth (none without one)."""
    return f"{amount / res['ms'] / 1e9 / peak_tbs * 100:.1f}%" if res and "ms" in res and peak_tbs else "-"


def floor_cell(res: dict | None, amount: float, peak_tbs: float | None = None) -> str:
    """The read floor's time and rate, and its share of the datasheet's where the card
    has one (`peers_cases.read_floor`; older reports have none)."""
    if not (res and "ms" in res):
        return "-"
    pct = share(res, amount, peak_tbs)
    return f"{res['ms']:.3f} ({rate(res, amount, 1e9)}{', ' + pct if pct != '-' else ''})"


def decode_table(rows: list[dict], peak_tbs: float | None = None) -> list[str]:
    head = ["batch x context"] + [f"{t} ms" for t, _ in DECODE] + [
        "kvpager TB/s", "kvpager % of datasheet", "read floor ms (TB/s, % of datasheet)", "kvpager / read floor",
        "FlashInfer / kvpager", "SDPA / kvpager", "rel. error kvpager / FlashInfer"]
    out = []
    for r in rows:
        if "results" not in r:
            out.append(_failed_row([r["case"]], r, len(head)))
            continue
        res = r["results"]
        out.append([r["case"], *(ms(res.get(k)) for _, k in DECODE),
                    rate(res.get("kvpager"), r["bytes"], 1e9), share(res.get("kvpager"), r["bytes"], peak_tbs),
                    floor_cell(res.get("read floor"), r["bytes"], peak_tbs),
                    ratio(res.get("read floor"), res.get("kvpager")),
                    ratio(res.get("flashinfer"), res.get("kvpager")), ratio(res.get("sdpa"), res.get("kvpager")),
                    errors(res, ["kvpager", "flashinfer"])])
    return table(head, out)


def graphed(res: dict | None) -> dict | None:
    """A contender's time in a captured graph as a cell's result (`ms`), or None."""
    return {"ms": res["graph_ms"]} if res and "graph_ms" in res else None


def graph_table(rows: list[dict], peak_tbs: float | None = None) -> list[str]:
    """The decode cases timed in a captured graph (reports from before it have none)."""
    head = ["batch x context"] + [f"{t} ms" for t, _ in DECODE] + [
        "kvpager % of datasheet", "FlashInfer % of datasheet", "SDPA % of datasheet",
        "FlashInfer / kvpager", "SDPA / kvpager"]
    out = []
    for r in rows:
        res = r.get("results", {})
        cells = [graphed(res.get(k)) for _, k in DECODE]
        if not any(cells):
            continue
        out.append([r["case"], *(ms(c) for c in cells), *(share(c, r["bytes"], peak_tbs) for c in cells),
                    ratio(cells[1], cells[0]), ratio(cells[2], cells[0])])
    return table(head, out) if out else []


def shared_table(rows: list[dict], peak_tbs: float | None) -> list[str]:
    head = ["sequences x (shared + own)", "groups"] + [f"{t} ms" for t, _ in SHARED] + [
        "floor ms", "FI cascade / kvpager cascade", "FI paged / kvpager plain", "SDPA / kvpager cascade",
        "rel. error (kvpager cascade / plain, FI cascade / paged)"]
    out = []
    for r in rows:
        if "results" not in r:
            out.append(_failed_row([r["case"], str(r.get("groups", "-"))], r, len(head)))
            continue
        res = r["results"]
        floor = f"{r['distinct_bytes'] / (peak_tbs * 1e9):.3f}" if peak_tbs else "-"
        out.append([r["case"], str(r["groups"]), *(ms(res.get(k)) for _, k in SHARED), floor,
                    ratio(res.get("flashinfer cascade"), res.get("kvpager cascade")),
                    ratio(res.get("flashinfer paged"), res.get("kvpager plain")),
                    ratio(res.get("sdpa"), res.get("kvpager cascade")),
                    errors(res, [k for _, k in SHARED[:4]])])
    return table(head, out)


def prefill_table(rows: list[dict]) -> list[str]:
    head = ["case"] + [c for t, _ in PREFILL for c in (f"{t} ms", "TFLOP/s")] + [
        "fa2 / kvpager", "fa3 / kvpager", "SDPA / kvpager", "rel. error kvpager / fa2 / fa3"]
    out = []
    for r in rows:
        if "results" not in r:
            out.append(_failed_row([r["case"]], r, len(head)))
            continue
        res = r["results"]
        cells = [c for _, k in PREFILL for c in (ms(res.get(k)), rate(res.get(k), r["flops"], 1e9, 0))]
        out.append([r["case"], *cells, *(ratio(res.get(k), res.get("kvpager")) for _, k in PREFILL[1:]),
                    errors(res, [k for _, k in PREFILL[:3]])])
    return table(head, out)


def notes(report: dict) -> list[str]:
    """Why a cell holds no time: failures, skipped cells, FlashInfer absent (once)."""
    lines = []
    for kind in ("decode", "shared", "prefill"):
        for r in report[kind]:
            for key in ("error", "skipped"):
                if key in r:
                    lines.append(f"- {kind} {r['case']}: {'failed' if key == 'error' else 'skipped'}: {r[key]}")
            for who, res in r.get("results", {}).items():
                for key in ("error", "skipped", "graph_error"):
                    if key in res:
                        word = {"error": "failed", "skipped": "skipped", "graph_error": "failed in a graph"}[key]
                        lines.append(f"- {kind} {r['case']}, {who}: {word}: {res[key]}")
    if report["versions"]["flashinfer"].startswith("absent"):
        lines.append(f"- FlashInfer: {report['versions']['flashinfer']}")
    return lines


def markdown(report: dict) -> str:
    v, g = report["versions"], report["geometry"]
    lines = [f"{report['card']}, {report['date']}; kvpager {v['kvpager']}, torch {v['torch']} (CUDA {v['cuda']}), "
             f"CuPy {v['cupy']}, FlashInfer {v['flashinfer']}",
             f"{g['dtype']}, {g['q_heads']} q / {g['kv_heads']} kv heads, head dim {g['head_dim']}, block size "
             f"{g['block_size']}, block tables shuffled; every time checked against SDPA first (relative error "
             f"< {g['tolerance']:g}); ratios are peer time / kvpager time (above 1.0x: kvpager is faster)", ""]
    lines += ["Paged decode (one query per sequence):", ""]
    lines += decode_table(report["decode"], report.get("datasheet_tbs")) + [""]
    graph = graph_table(report["decode"], report.get("datasheet_tbs"))
    if graph:
        lines += ["The same, timed as a model's captured step runs them (20 calls in one CUDA graph, no event "
                  "between calls; the output poisoned before the replays and checked after):", ""] + graph + [""]
    lines += ["Shared-prefix decode (groups of sequences sharing a prefix, then their own tokens):", ""]
    lines += shared_table(report["shared"], report.get("datasheet_tbs")) + [""]
    lines += ["Multi-token attention (new tokens on cached ones, causal):", ""] + prefill_table(report["prefill"])
    extra = notes(report)
    return "\n".join(lines + ([""] + extra if extra else []))
