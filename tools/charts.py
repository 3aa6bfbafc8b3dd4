"""Figures for `mlxc bench --compare` and `mlxc diff`: one matplotlib figure each (Agg and SVG backends, no
display), written as PNG or SVG for a README, or inlined as SVG into a self-contained HTML page.

Texts stay text in the SVG (`svg.fonttype: none`) and the drawn elements carry ids (`prefill-fused`,
`rel-error`, `tolerance`, `first-divergent`), so a page can be searched and checked against the measured values.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

from ..ir.errors import MlxcError

TEMPLATES = Path(__file__).parent / "templates"
COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _figure(width: float, height: float):
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise MlxcError("charts need matplotlib (pip install 'mlxc[plot]' or pip install matplotlib)") from None
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays <text>: searchable, and smaller
    matplotlib.rcParams["svg.hashsalt"] = "mlxc"  # the same figure gives the same SVG
    return Figure(figsize=(width, height), layout="constrained")


def fmt_tps(x: float) -> str:
    """Tokens/s as the charts and tables print them."""
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


# ------------------------------------------------------------------------------------------------------ bench


def bench_figure(report):
    """Two panels, prefill and decode: one bar per variant at its median tokens/s, the whiskers its min and max."""
    names = [v.name for v in report.variants]
    fig = _figure(max(6.0, 1.6 + 1.5 * len(names)), 3.6)
    axes = fig.subplots(1, 2)
    for ax, phase in zip(axes, ("prefill", "decode")):
        spreads = [getattr(v, phase) for v in report.variants]
        meds = [s.median for s in spreads]
        err = [[m - s.min for m, s in zip(meds, spreads)], [s.max - m for m, s in zip(meds, spreads)]]
        colours = [COLOURS[i % len(COLOURS)] for i in range(len(names))]
        bars = ax.bar(range(len(names)), meds, color=colours, yerr=err, capsize=4, ecolor="#333333")
        for bar, name in zip(bars, names):
            bar.set_gid(f"{phase}-{name}")
        top = max(s.max for s in spreads) or 1.0
        for i, (m, s) in enumerate(zip(meds, spreads)):
            ax.text(i, s.max + 0.02 * top, fmt_tps(m), ha="center", va="bottom", fontsize=9, gid=f"{phase}-{names[i]}-value")
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
        tokens = report.prompt_tokens if phase == "prefill" else report.gen_tokens
        ax.set_title(f"{phase} ({tokens} tokens)", fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(f"{report.source} · {report.dtype} · median of {report.repeats} rounds, whiskers min–max",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------------- diff


def diff_figure(report):
    """Relative error per compared tensor on a log scale, the tolerance as a line, the first row beyond it marked."""
    rows = report.rows
    rel = [r.rel for r in rows]
    finite = [x for x in rel if math.isfinite(x) and x > 0]
    floor = min(finite + [report.tol or 1e-12]) / 10 if finite or report.tol else 1e-12
    shown = [x if math.isfinite(x) and x > 0 else (floor if x == 0 else None) for x in rel]
    fig = _figure(max(6.5, min(14.0, 3.0 + 0.22 * len(rows))), 3.8)
    ax = fig.subplots()
    xs = list(range(len(rows)))
    pts = [(x, y) for x, y in zip(xs, shown) if y is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#4c72b0", marker="o", markersize=4, linewidth=1,
            gid="rel-error")
    bad = [(x, y) for x, y, r in zip(xs, shown, rows) if not r.within and y is not None]
    if bad:
        ax.plot([p[0] for p in bad], [p[1] for p in bad], linestyle="none", marker="o", markersize=6,
                color="#c44e52", gid="beyond-tolerance")
    if report.tol > 0:
        ax.axhline(report.tol, color="#c44e52", linestyle="--", linewidth=1, gid="tolerance")
        ax.text(len(rows) - 0.5, report.tol, f"tolerance {report.tol:g}", color="#c44e52", ha="right", va="bottom",
                fontsize=8)
    first = report.first_divergent
    if first is not None:
        i = rows.index(first)
        ax.axvline(i, color="#c44e52", linewidth=1, alpha=0.6, gid="first-divergent")
        label = f"first divergence: {first.name}" + (f" (layer {first.layer})" if first.layer is not None else "")
        ax.annotate(label, (i, shown[i] if shown[i] is not None else report.tol), xytext=(6, 10),
                    textcoords="offset points", fontsize=8, color="#c44e52")
    ax.set_yscale("log")
    step = max(1, math.ceil(len(rows) / 40))
    ticks = [i for i in xs if i % step == 0 or i == len(rows) - 1]
    ax.set_xticks(ticks, [_short(rows[i].name) for i in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("relative error (max |diff| / max |ref|)")
    ax.grid(alpha=0.3, which="both", axis="y")
    if any(x == 0 for x in rel):
        ax.text(0.01, 0.02, f"exact rows drawn at {floor:.0e}", transform=ax.transAxes, fontsize=7, color="#666666")
    fig.suptitle(f"{report.candidate} vs {report.reference} · {len(report.tokens)} tokens", fontsize=10)
    return fig


def _short(name: str) -> str:
    return name.replace("layers.", "L") if name.startswith("layers.") else name


# ------------------------------------------------------------------------------------------------- output


def figure_bytes(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110 if fmt == "png" else None, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """PNG or SVG by the file's suffix."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise MlxcError(f"{path}: a figure is written as .png or .svg")
    from ..files import write_bytes_atomic

    write_bytes_atomic(path, figure_bytes(fig, fmt))
    return path


def html_page(title: str, fig, table: list[list[Any]], data: dict[str, Any], caption: str = "") -> str:
    """A self-contained page: the figure as inline SVG, the numbers as a table, and the JSON they came from."""
    svg = figure_bytes(fig, "svg").decode()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)  # matplotlib's RDF credits
    head, *rows = table
    esc = _escape
    thead = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    page = (TEMPLATES / "chart.html").read_text()
    parts = {"TITLE": esc(title), "CAPTION": esc(caption), "SVG": svg, "TABLE": thead + tbody,
             "DATA": json.dumps(data).replace("</", "<\\/")}
    return re.sub(r"/\*(TITLE|CAPTION|SVG|TABLE|DATA)\*/", lambda m: parts[m[1]], page)


def _escape(x: Any) -> str:
    return str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def bench_table(report) -> list[list[Any]]:
    base = report.baseline
    rows = [["variant", "prefill tok/s (median)", "min – max", "decode tok/s (median)", "min – max", "vs " + base.name,
             "notes"]]
    for v in report.variants:
        p, d = v.prefill, v.decode
        ratio = f"prefill ×{p.median / base.prefill.median:.2f}, decode ×{d.median / base.decode.median:.2f}"
        rows.append([v.name, fmt_tps(p.median), f"{fmt_tps(p.min)} – {fmt_tps(p.max)}", fmt_tps(d.median),
                     f"{fmt_tps(d.min)} – {fmt_tps(d.max)}", ratio, "; ".join(v.notes)])
    return rows


def diff_table(report) -> list[list[Any]]:
    first = report.first_divergent
    rows = [["tensor", "max |diff|", "rel. error", ""]]
    for r in report.rows:
        mark = "ok" if r.within else ("first divergence" if r is first else "beyond tolerance")
        rows.append([r.name, f"{r.max_abs:.3e}", f"{r.rel:.3e}", mark])
    return rows
