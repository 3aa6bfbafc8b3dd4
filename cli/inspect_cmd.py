"""What a model source is: its family and how it was detected, its head, which layers are sliding and which global,
rope bases and FFN kinds per layer, parameters, memory per dtype, storage types and the active BLAS."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from ..ir.errors import MlxcError
from .common import add_source, consoles, write

HELP = "family and how it was detected, head, layers (sliding/global, rope, FFN), parameters, memory, BLAS"

_MEMORY = (("float32", 4), ("float16 / bfloat16", 2), ("8-bit (group 64)", 1 + 4 / 64),
           ("4-bit (group 64)", 0.5 + 4 / 64))


def add_parser(p) -> None:
    add_source(p, build_flags=False)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the tables")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def layer_ranges(indices: Iterable[int]) -> str:
    """Layer indices as people read them: `0-4, 6-10`, or `1-25 every 2nd` for an alternation (Gemma 2's
    global layers), so a 62-layer pattern stays one short cell."""
    idx = sorted(indices)
    if not idx:
        return "none"
    steps = {b - a for a, b in zip(idx, idx[1:])}
    if len(idx) >= 3 and len(steps) == 1 and (step := steps.pop()) > 1:
        return f"{idx[0]}-{idx[-1]} every {_ordinal(step)}"
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _layer_parameters(spec) -> tuple[list[int], int]:
    """Parameters of each layer and outside the layers, counted from the lowered program as `num_parameters` is."""
    from math import prod

    from ..frontends.lower import lower

    per_layer, outside = [0] * spec.num_layers, 0
    for name, p in lower(spec).parameters():
        m = re.match(r"layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] += prod(p.type.shape)
        else:
            outside += prod(p.type.shape)
    return per_layer, outside


def _rope(rope, theta: float, dims: int, head_dim: int) -> dict[str, Any]:
    out: dict[str, Any] = {"theta": theta, "kind": rope.kind.value if rope is not None else "none"}
    if rope is not None and rope.kind.value != "default":
        out["factor"] = rope.factor
    if dims < head_dim:
        out["rotary_dims"] = dims
    return out


def _rope_text(r: dict[str, Any], head_dim: int) -> str:
    if r["kind"] == "none":
        return "none"
    theta = r["theta"]
    text = f"theta {int(theta)}" if float(theta).is_integer() else f"theta {theta:g}"
    text += f", {r['kind']} x{r['factor']:g}" if "factor" in r else ""
    return text + (f", rotary {r['rotary_dims']}/{head_dim} dims" if "rotary_dims" in r else "")


def _ffn(f) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": f.kind.value, "activation": f.activation.value}
    if f.moe is None:
        return {**out, "intermediate_size": f.intermediate_size, "bias": f.bias}
    m = f.moe
    out.update(num_experts=m.num_experts, top_k=m.top_k, expert_intermediate_size=m.intermediate_size,
               renormalized=m.normalize)
    if m.shared_expert_intermediate_size:
        out.update(shared_expert_intermediate_size=m.shared_expert_intermediate_size,
                   shared_expert_gate=m.shared_expert_gate)
    return out


def _ffn_text(f: dict[str, Any]) -> str:
    if f["kind"] == "none":
        return "none"
    if f["kind"] != "moe":
        return f"{f['kind']} {f['activation']} {f['intermediate_size']}" + (" +bias" if f["bias"] else "")
    text = (f"MoE {f['num_experts']} experts top-{f['top_k']} x {f['expert_intermediate_size']} {f['activation']}"
            + (" renormalized" if f["renormalized"] else ""))
    if "shared_expert_intermediate_size" in f:
        text += f" + shared {f['shared_expert_intermediate_size']}" + (" gated" if f["shared_expert_gate"] else "")
    return text


def _attention_kind(a) -> str:
    if a.num_kv_heads == a.num_heads:
        return "MHA"
    return "MQA" if a.num_kv_heads == 1 else "GQA"


def _layer_groups(spec) -> list[dict[str, Any]]:
    """Layers with the same description, one entry per distinct description (in order of first layer), so
    alternating layers collapse into two rows instead of one per layer."""
    per_layer, _ = _layer_parameters(spec)
    groups: dict[str, dict[str, Any]] = {}
    for i in range(spec.num_layers):
        c = spec.layer(i)
        a = c.attention  # None for a mixer layer (Mamba, RNN): its settings are `mixer`
        row = {
            "block": c.block.value,
            "attention": ("sliding" if a.window else "global") if a else None,
            "heads": _attention_kind(a) if a else None,
            "window": a.window if a else None,
            "rope": _rope(a.rope, a.rope_theta, a.rope_dims, a.head_dim) if a else None,
            "ffn": _ffn(c.ffn) if c.ffn is not None else {"kind": "none"},
            "parameters_each": per_layer[i],
        }
        if c.mixer is not None:
            row["mixer"] = c.mixer.model_dump(mode="json")
        key = json.dumps(row, sort_keys=True)
        groups.setdefault(key, {"layers": [], **row})["layers"].append(i)
    return [{**g, "ranges": layer_ranges(g["layers"])} for g in groups.values()]


def _head(spec) -> dict[str, Any]:
    h = spec.head
    out: dict[str, Any] = {"kind": h.kind.value}
    if h.kind.value == "causal_lm":
        out.update(tied_to_embeddings=spec.tie_word_embeddings, bias=spec.lm_head_bias,
                   final_logit_softcap=spec.final_logit_softcap)
    else:
        out.update(num_labels=h.num_labels, problem_type=h.problem.value, bias=h.bias,
                   classifier_hidden_size=h.classifier_hidden_size)
        if h.kind.value == "sequence_classification":
            out["pooling"] = h.pooling.value
    return out


def _head_text(h: dict[str, Any]) -> str:
    if h["kind"] == "causal_lm":
        text = "causal LM" + (", tied to the embeddings" if h["tied_to_embeddings"] else "")
        text += ", with bias" if h["bias"] else ""
        cap = h["final_logit_softcap"]
        return text + (f", final logits soft-capped at {cap:g}" if cap else "")
    text = f"{h['kind'].replace('_', ' ')}: {h['num_labels']} label{'s' if h['num_labels'] != 1 else ''} " \
           f"({h['problem_type'].replace('_', ' ')})"
    if "pooling" in h:
        text += f", {h['pooling']}-token pooling"
    if h["classifier_hidden_size"]:
        text += f", MLP classifier ({h['classifier_hidden_size']} hidden)"
    return text


def _attention_extras(spec) -> str:
    """What the attention does beyond softmax(q k^T / sqrt(d)) v: biases, a custom scale, soft-capping, q/k norm."""
    extras = []
    if spec.attention_bias:
        extras.append("q/k/v bias")
    if spec.out_bias:
        extras.append("output bias")
    if spec.query_scale is not None and spec.query_scale != spec.dim_per_head ** -0.5:
        extras.append(f"query scale {spec.query_scale:.6g}")
    if spec.attn_logit_softcap:
        extras.append(f"logits soft-capped at {spec.attn_logit_softcap:g}")
    if spec.qk_norm:
        extras.append("q/k RMSNorm")
    return ", ".join(extras) or "plain"


def describe(spec, what: str, detection, storage: dict[str, int], notice: str | None) -> dict[str, Any]:
    """Everything `inspect` reports, as plain data: the JSON document, and what the tables show."""
    from ..blas import active_blas

    n = spec.num_parameters()
    groups = _layer_groups(spec)
    sliding = [i for i in range(spec.num_layers) if spec.window_of(i)]
    blas = active_blas()
    return {
        "name": spec.name,
        "source": what,
        "notice": notice,
        "family": spec.family,
        "detected_from": {"via": detection.via, "evidence": list(detection.evidence)} if detection else None,
        "head": _head(spec),
        "parameters": n,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.kv_heads,
        "head_dim": spec.dim_per_head if spec.has_attention else None,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "position": spec.position.value,
        "norm": {"kind": spec.norm.value, "eps": spec.norm_eps, "unit_offset": spec.norm_unit_offset,
                 "residual": spec.residual.value},
        "embedding_multiplier": spec.embedding_multiplier,
        "attention": _attention_extras(spec),
        "sliding_layers": sliding,
        "global_layers": [i for i in range(spec.num_layers) if not spec.window_of(i)],
        "sliding_window": spec.sliding_window if sliding else None,
        "layer_groups": groups,
        "memory_bytes": {name: round(n * bpp) for name, bpp in _MEMORY},
        "stored_as": storage,
        "blas": {"name": blas.name, "path": blas.path},
        "native_kernels": _native_kernels(),
    }


def _native_kernels() -> dict[str, Any]:
    """Whether mlxc's native CPU kernels run here (`kernels=auto` picks them for quantized weights on the CPU)."""
    from ..kernels import native

    return {"available": native.available(), "isa": native.isa(), "reason": native.reason(),
            "description": native.describe()}


def _property_rows(d: dict[str, Any], detection) -> list[tuple[str, str]]:
    n, groups = d["parameters"], d["layer_groups"]
    attn = [g for g in groups if g["attention"] is not None] or [{"heads": "no attention layers", "rope": None}]
    ropes = {json.dumps(g["rope"], sort_keys=True) for g in attn}
    norm = d["norm"]
    rows = [
        ("family", str(detection) if detection is not None else d["family"]),
        ("head", _head_text(d["head"])),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)" if n > 1e9 else f"{n:,} ({n / 1e6:.1f} M)"),
        ("layers", str(d["num_layers"])),
        ("hidden / intermediate", f"{d['hidden_size']} / {d['intermediate_size']}"),
        ("heads / kv heads / head_dim", f"{d['num_heads']} / {d['num_kv_heads']} / {d['head_dim']} "
                                        f"({attn[0]['heads']})" if d["num_heads"] else "none (no attention layers)"),
        ("vocabulary", str(d["vocab_size"])),
        ("context length", f"{d['max_position_embeddings']:,}"),
        ("positions", d["position"]),
        ("rope", "per layer (see layers)" if len(ropes) > 1 else
                 _rope_text(attn[0]["rope"], d["head_dim"]) if attn[0]["rope"] else "none"),
    ]
    if d["sliding_layers"]:
        rows += [("sliding layers", f"{layer_ranges(d['sliding_layers'])} (window {d['sliding_window']:,})"),
                 ("global layers", layer_ranges(d["global_layers"]))]
    else:
        rows.append(("sliding window", "none"))
    rows += [
        ("norms", f"{'RMSNorm' if norm['kind'] == 'rms' else 'LayerNorm'} eps {norm['eps']:g}"
                  + (" (1 + w)" if norm["unit_offset"] else "") + f", {norm['residual'].replace('_', '-')}"),
        ("attention", d["attention"]),
        ("embeddings", ("tied" if d["head"].get("tied_to_embeddings") else "untied")
                       + (f", scaled by {d['embedding_multiplier']:g}" if d["embedding_multiplier"] else "")),
    ]
    if d["stored_as"]:
        rows.append(("stored as", ", ".join(f"{k} ({v} tensors)" for k, v in d["stored_as"].items())))
    if d["notice"]:
        rows.append(("note", d["notice"]))
    rows.append(("BLAS", f"{d['blas']['name']} ({d['blas']['path'] or 'bundled'})"))
    rows.append(("kernels", d["native_kernels"]["description"]))
    return rows


def _print_tables(d: dict[str, Any], detection) -> None:
    t = Table(title=f"{d['name']} — {d['source']}")
    t.add_column("property")
    t.add_column("value", overflow="fold")
    for k, v in _property_rows(d, detection):
        t.add_row(k, v)
    consoles.out.print(t)

    mem = Table(title="memory for weights")
    mem.add_column("dtype")
    mem.add_column("bytes/param", justify="right")
    mem.add_column("size", justify="right")
    for name, bpp in _MEMORY:
        mem.add_row(name, f"{bpp:g}", _human(d["memory_bytes"][name]))
    consoles.out.print(mem)

    groups = d["layer_groups"]
    per_layer_rope = len({json.dumps(g["rope"], sort_keys=True) for g in groups if g["rope"] is not None}) > 1
    columns = ["layers", "count", "block", "attention", "window"] + (["rope"] if per_layer_rope else []) + \
        ["ffn", "params each"]
    layers = Table(title="layers")
    for c in columns:
        layers.add_column(c, justify="right" if c in ("count", "window", "params each") else "left")
    for g in groups:
        row = [g["ranges"], str(len(g["layers"])), g["block"],
               f"{g['heads']} {g['attention']}" if g["attention"] else "-", f"{g['window']:,}" if g["window"] else "-"]
        if per_layer_rope:
            row.append(_rope_text(g["rope"], d["head_dim"]) if g["rope"] else "-")
        layers.add_row(*row, _ffn_text(g["ffn"]), f"{g['parameters_each']:,}")
    consoles.out.print(layers)


def run(args) -> int:
    from ..api import SourceKind, read_source, resolve
    from ..frontends.hf import Detection
    from ..frontends.spec import ModelSpec
    from ..runtime.artifact import read_manifest

    if args.dtype is not None:
        raise MlxcError("inspect describes the source as it is; --dtype cannot apply "
                        "(the memory table lists every dtype)")
    source = resolve(args.src)
    storage: dict[str, int] = {}
    notice = None
    if source.kind == SourceKind.ARTIFACT:
        manifest = read_manifest(Path(source.location))
        from ..plugins import check_required

        check_required(manifest.plugins, source.location)  # its spec may name a plugin's block kinds
        if not manifest.spec:
            raise MlxcError(f"{source.location}: the manifest has no spec to inspect")
        spec, what = ModelSpec.model_validate(manifest.spec), f"artifact ({manifest.source}, {manifest.dtype})"
        detection = Detection(spec.family, "artifact manifest", (str(manifest.source),))
    else:
        front = read_source(source, weights=False)
        spec, what, storage, detection, notice = (front.spec, front.description, front.stored_types,
                                                  front.detection, front.notice)
    d = describe(spec, what, detection, storage, notice)
    if args.json:
        write(json.dumps(d, indent=2))
    else:
        _print_tables(d, detection)
    return 0
