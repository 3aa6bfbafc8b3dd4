"""Parameters, memory per dtype, storage types, the per-layer table and the active BLAS of a model source."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..ir.errors import MlxcError
from .common import add_source, consoles

HELP = "parameters, memory per dtype, per-layer table, active BLAS"


def add_parser(p) -> None:
    add_source(p, build_flags=False)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _layer_rows(spec) -> list[tuple[str, ...]]:
    """One row per run of identical consecutive layers (`0-29`), so a 30-layer model is one line, not thirty."""
    per_layer = (spec.num_parameters() - _non_layer_params(spec)) // spec.num_layers
    rows: list[list] = []
    for i, layer in enumerate(spec.layers):
        key = (layer.block.value, spec.attention_kind, str(spec.window_of(i) or "-"), f"{per_layer:,}")
        if rows and rows[-1][1] == key and rows[-1][0][1] == i - 1:
            rows[-1][0][1] = i
        else:
            rows.append([[i, i], key])
    return [((f"{a}" if a == b else f"{a}-{b}"),) + key for (a, b), key in rows]


def _non_layer_params(spec) -> int:
    h = spec.hidden_size
    norm = h if spec.norm.value == "rms" else 2 * h
    return spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) + norm


def run(args) -> int:
    from ..api import SourceKind, read_source, resolve
    from ..blas import active_blas
    from ..frontends.spec import ModelSpec
    from ..runtime.artifact import read_manifest

    if args.dtype is not None:
        raise MlxcError("inspect describes the source as it is; --dtype cannot apply (the memory table lists every dtype)")
    source = resolve(args.src)
    storage: dict[str, int] = {}
    if source.kind == SourceKind.ARTIFACT:
        manifest = read_manifest(Path(source.location))
        if not manifest.spec:
            raise MlxcError(f"{source.location}: the manifest has no spec to inspect")
        spec, what = ModelSpec.model_validate(manifest.spec), f"artifact ({manifest.source}, {manifest.dtype})"
    else:
        front = read_source(source, weights=False)
        spec, what, storage = front.spec, front.description, front.stored_types
    n = spec.num_parameters()
    t = Table(title=f"{spec.name} — {what}")
    t.add_column("property")
    t.add_column("value", overflow="fold")
    blas = active_blas()
    rows = [
        ("family", spec.family),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)" if n > 1e9 else f"{n:,} ({n / 1e6:.1f} M)"),
        ("layers", str(spec.num_layers)),
        ("hidden / intermediate", f"{spec.hidden_size} / {spec.intermediate_size}"),
        ("heads / kv heads / head_dim",
         f"{spec.num_heads} / {spec.kv_heads} / {spec.dim_per_head} ({spec.attention_kind})"),
        ("vocabulary", str(spec.vocab_size)),
        ("context length", f"{spec.max_position_embeddings:,}"),
        ("rope", f"theta {spec.rope.theta:g}, {spec.rope.kind.value}"
                 + (f" x{spec.rope.factor:g}" if spec.rope.factor != 1 else "")),
        ("sliding window", str(spec.sliding_window) if spec.sliding_window else "none"),
        ("tied embeddings", str(spec.tie_word_embeddings)),
    ]
    if storage:
        rows.append(("stored as", ", ".join(f"{k} ({v} tensors)" for k, v in storage.items())))
    rows.append(("BLAS", f"{blas.name} ({blas.path or 'bundled'})"))
    for k, v in rows:
        t.add_row(k, v)
    consoles.out.print(t)

    mem = Table(title="memory for weights")
    mem.add_column("dtype")
    mem.add_column("bytes/param", justify="right")
    mem.add_column("size", justify="right")
    for name, bpp in (("float32", 4), ("float16 / bfloat16", 2), ("8-bit (group 64)", 1 + 4 / 64),
                      ("4-bit (group 64)", 0.5 + 4 / 64)):
        mem.add_row(name, f"{bpp:g}", _human(n * bpp))
    consoles.out.print(mem)

    layers = Table(title="layers")
    for c in ("layers", "block", "attention", "window", "params each"):
        layers.add_column(c, justify="right" if c in ("layers", "params each") else "left")
    for row in _layer_rows(spec):
        layers.add_row(*row)
    consoles.out.print(layers)
    return 0
