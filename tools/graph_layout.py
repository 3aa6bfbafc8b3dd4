"""Positions for drawing a dataflow graph top to bottom: Graphviz's `dot` when it is installed, else a small layered
layout of mlxc's own, so the HTML explorer draws every function on any machine.

Both return the same thing (`Layout`): node centres and sizes, and each edge as an SVG path, in pixels with y
growing downwards. Only positions come from here; the page draws the nodes itself, so both engines look alike.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Sequence

RANK_SEP = 34.0  # vertical gap between layers (px)
NODE_SEP = 16.0  # horizontal gap between neighbours (px)
MARGIN = 12.0


@dataclass
class Layout:
    engine: str  # "graphviz dot" or "mlxc layered"
    width: float
    height: float
    nodes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # id -> (cx, cy, w, h)
    edges: list[str] = field(default_factory=list)  # SVG path per input edge, in order


def layout(nodes: Sequence[tuple[str, float, float]], edges: Sequence[tuple[str, str]],
           engine: str = "auto") -> Layout:
    """Lay out `nodes` ((id, width, height), in topological order) and `edges` ((from, to)).

    `engine`: "dot", "layered", or "auto" (dot when on PATH, and the layered layout if dot fails)."""
    if engine in ("auto", "dot") and shutil.which("dot") is not None:
        try:
            return _dot(nodes, edges)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            if engine == "dot":
                raise
    elif engine == "dot":
        raise FileNotFoundError("Graphviz's `dot` is not on PATH")
    return _layered(nodes, edges)


# ------------------------------------------------------------------------------------------------ graphviz


def _dot(nodes, edges) -> Layout:
    """`dot -Tplain` gives node centres and each edge's cubic B-spline control points in inches, y upwards."""
    ids = {n: f"n{i}" for i, (n, _, _) in enumerate(nodes)}
    lines = ["digraph g {", f"  rankdir=TB; nodesep={NODE_SEP / 72:.3f}; ranksep={RANK_SEP / 72:.3f};",
             '  node [shape=box fixedsize=true label=""]; edge [dir=none];']
    lines += [f"  {ids[n]} [width={w / 72:.3f} height={h / 72:.3f}];" for n, w, h in nodes]
    lines += [f"  {ids[a]} -> {ids[b]};" for a, b in edges]
    lines.append("}")
    out = subprocess.run(["dot", "-Tplain"], input="\n".join(lines), capture_output=True, text=True, check=True,
                         timeout=60).stdout
    back = {v: k for k, v in ids.items()}
    height = 0.0
    result = Layout("graphviz dot", 0, 0)
    splines: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for line in out.splitlines():
        f = line.split()
        if not f:
            continue
        if f[0] == "graph":
            result.width, height = float(f[2]) * 72, float(f[3]) * 72
        elif f[0] == "node":
            x, y, w, h = (float(v) * 72 for v in f[2:6])
            result.nodes[back[f[1]]] = (x, height - y, w, h)
        elif f[0] == "edge":
            n = int(f[3])
            pts = [(float(f[4 + 2 * i]) * 72, height - float(f[5 + 2 * i]) * 72) for i in range(n)]
            splines.setdefault((back[f[1]], back[f[2]]), []).append(pts)
    result.height = height
    for a, b in edges:  # parallel edges come back in order
        pts = splines[(a, b)].pop(0)
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for i in range(1, len(pts) - 2, 3):
            d += "C" + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts[i:i + 3])
        result.edges.append(d)
    return _pad(result)


def _pad(result: Layout) -> Layout:
    """Shift everything by the margin (dot puts nodes against the border)."""
    import re

    m = MARGIN

    def shift(d: str) -> str:
        return re.sub(r"(-?[\d.]+),(-?[\d.]+)", lambda g: f"{float(g[1]) + m:.1f},{float(g[2]) + m:.1f}", d)

    result.nodes = {k: (x + m, y + m, w, h) for k, (x, y, w, h) in result.nodes.items()}
    result.edges = [shift(d) for d in result.edges]
    result.width += 2 * m
    result.height += 2 * m
    return result


# ------------------------------------------------------------------------------------------ own layered layout


def _layered(nodes, edges) -> Layout:
    """A compact Sugiyama layout: longest-path layers (then every node pulled down next to its first reader), dummy
    nodes on long edges, barycentre ordering sweeps, then x positions relaxed towards neighbours."""
    size = {n: (w, h) for n, w, h in nodes}
    order = [n for n, _, _ in nodes]
    preds: dict[str, list[str]] = {n: [] for n in order}
    succs: dict[str, list[str]] = {n: [] for n in order}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    rank: dict[str, int] = {}
    for n in order:  # topological order: every predecessor is ranked already
        rank[n] = 1 + max((rank[p] for p in preds[n]), default=-1)
    for n in reversed(order):  # then as late as its readers allow: side branches (a parameter's load-time work)
        if succs[n]:           # sit just above their first reader instead of at the top
            rank[n] = max(rank[n], min(rank[s] for s in succs[n]) - 1)

    # long edges get one dummy node per layer they cross
    chains: list[list[str]] = []
    adj_up: dict[str, list[str]] = {n: [] for n in order}
    adj_down: dict[str, list[str]] = {n: [] for n in order}
    for k, (a, b) in enumerate(edges):
        chain = [a]
        for r in range(rank[a] + 1, rank[b]):
            d = f"\0{k}:{r}"
            rank[d], size[d] = r, (2.0, 0.0)
            adj_up[d], adj_down[d] = [], []
            chain.append(d)
        chain.append(b)
        for u, v in zip(chain, chain[1:]):
            adj_down[u].append(v)
            adj_up[v].append(u)
        chains.append(chain)
    depth = 1 + max(rank.values(), default=0)
    layers: list[list[str]] = [[] for _ in range(depth)]
    for n in list(order) + [d for c in chains for d in c[1:-1]]:
        layers[rank[n]].append(n)

    pos = {n: float(i) for layer in layers for i, n in enumerate(layer)}
    for sweep in range(6):
        down = sweep % 2 == 0
        for layer in (layers[1:] if down else layers[-2::-1]):
            nbrs = adj_up if down else adj_down

            def key(n: str) -> float:
                ps = [pos[p] for p in nbrs[n]]
                return sum(ps) / len(ps) if ps else pos[n]

            layer.sort(key=key)
            for i, n in enumerate(layer):
                pos[n] = float(i)

    x = {}
    for layer in layers:
        at = 0.0
        for n in layer:
            w = size[n][0]
            x[n] = at + w / 2
            at += w + NODE_SEP
    for _ in range(12):  # pull each node towards the mean of its neighbours, keeping order and gaps
        for layer in layers:
            want = []
            for n in layer:
                ns = adj_up[n] + adj_down[n]
                want.append(sum(x[m] for m in ns) / len(ns) if ns else x[n])
            _place(layer, want, size, x)
    left = min((x[n] - size[n][0] / 2 for n in x), default=0.0)
    ys, top = [], 0.0
    for layer in layers:
        h = max((size[n][1] for n in layer), default=0.0)
        ys.append(top + h / 2)
        top += h + RANK_SEP
    result = Layout("mlxc layered", 0, max(top - RANK_SEP, 0.0))
    for n in order:
        w, h = size[n]
        result.nodes[n] = (x[n] - left, ys[rank[n]], w, h)
    result.width = max((cx + w / 2 for cx, _, w, _ in result.nodes.values()), default=0.0)
    for chain in chains:
        pts = [(x[chain[0]] - left, ys[rank[chain[0]]] + size[chain[0]][1] / 2)]
        pts += [(x[d] - left, ys[rank[d]]) for d in chain[1:-1]]
        pts.append((x[chain[-1]] - left, ys[rank[chain[-1]]] - size[chain[-1]][1] / 2))
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            mid = (y0 + y1) / 2
            d += f"C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"
        result.edges.append(d)
    return _pad(result)


def _place(layer: list[str], want: list[float], size, x: dict[str, float]) -> None:
    """Positions as close to `want` as the order and the minimum gaps allow (a left and a right sweep, averaged)."""
    if not layer:
        return
    half = [size[n][0] / 2 for n in layer]
    right = list(want)
    for i in range(1, len(layer)):
        right[i] = max(right[i], right[i - 1] + half[i - 1] + NODE_SEP + half[i])
    left = list(want)
    for i in range(len(layer) - 2, -1, -1):
        left[i] = min(left[i], left[i + 1] - half[i + 1] - NODE_SEP - half[i])
    merged = [(a + b) / 2 for a, b in zip(left, right)]
    for i in range(1, len(layer)):  # averaging can squeeze neighbours: restore the gaps
        merged[i] = max(merged[i], merged[i - 1] + half[i - 1] + NODE_SEP + half[i])
    for n, v in zip(layer, merged):
        x[n] = v
