"""`mlxc diff`: where two implementations of one model part ways, layer by layer.

The mlxc side is the compiled model itself: the `expose-hidden` pass makes @main also return the embedding output,
each layer's output and the final norm, and that program is generated and run with the loaded model's own weights,
so what is compared is what `mlxc.load` runs (fused, quantized, converted). The reference is transformers (forward
hooks on the embedding, each decoder layer and the final norm) or a second mlxc model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..ir import verify
from ..ir.errors import MlxcError
from ..passes.expose_hidden import EMBEDDINGS, NORM, ExposeHidden, capture_points

Progress = Optional[Callable[[str], None]]
LOGITS = "logits"

# Default tolerance on the relative error, by the least precise compute dtype of the two sides.
DEFAULT_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class Row:
    """One compared tensor: the embeddings, a layer's output, the final norm or the logits."""

    name: str
    layer: Optional[int]  # the decoder layer's index, None for the other rows
    max_abs: float  # max |candidate - reference|
    rel: float  # max_abs / max |reference|
    tol: float

    @property
    def within(self) -> bool:
        return math.isfinite(self.rel) and self.rel <= self.tol


@dataclass
class DiffReport:
    candidate: str
    reference: str
    tokens: list[int]
    tol: float
    rows: list[Row] = field(default_factory=list)

    @property
    def first_divergent(self) -> Optional[Row]:
        return next((r for r in self.rows if not r.within), None)

    @property
    def first_divergent_layer(self) -> Optional[int]:
        """The first decoder layer beyond tolerance (None when every layer is within it, even if the logits are not)."""
        return next((r.layer for r in self.rows if r.layer is not None and not r.within), None)

    @property
    def ok(self) -> bool:
        return self.first_divergent is None

    def to_json(self) -> dict:
        def num(x: float):
            return x if math.isfinite(x) else None  # JSON has no NaN: a non-finite difference is null (diverged)

        first = self.first_divergent
        return {
            "candidate": self.candidate, "reference": self.reference, "tokens": self.tokens, "tol": self.tol,
            "rows": [{"name": r.name, "layer": r.layer, "max_abs_diff": num(r.max_abs), "rel_err": num(r.rel),
                      "within_tol": r.within} for r in self.rows],
            "first_divergent": first.name if first else None,
            "first_divergent_layer": self.first_divergent_layer,
            "ok": self.ok,
        }


# ------------------------------------------------------------------------------------------------ the mlxc side


class HiddenStateProbe:
    """A loaded model's program with its hidden states exposed, bound to the same weight arrays (no copies)."""

    def __init__(self, model):
        from mlx.utils import tree_flatten

        from ..codegen import generate_module, import_module, write_module

        program = copy.deepcopy(model.program)
        self.labels = [label for label, _ in capture_points(program.main)]
        calls = [label for label in self.labels if label not in (EMBEDDINGS, NORM)]
        self.layers = {label: i for i, label in enumerate(calls)}  # a layer call's label -> its index
        program, _ = ExposeHidden().run(program)
        verify(program)
        code = generate_module(program, title=f"{model.source}: hidden states exposed for mlxc diff.")
        module = import_module(write_module(code))
        self.net = module.Model()
        try:
            self.net.load_weights(tree_flatten(model.net.parameters()), strict=True)
        except ValueError as e:
            raise MlxcError(f"the exposed program rejected the model's weights: {e}") from None
        self.net.eval()
        self.model = model

    def __call__(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        x = self.model.check_ids(mx.array([list(ids)]))
        outs = self.net(x, 0)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        arrays = dict(zip(self.labels, outs[1:]))
        arrays[LOGITS] = outs[0]
        return {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}


def hidden_states(model, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Embeddings, each layer's output, the final norm and the logits of a loaded model on `ids` (float32)."""
    return HiddenStateProbe(model)(ids)


# ------------------------------------------------------------------------------------------ the transformers side


def _transformers_source(src):
    """The resolved source, if transformers can load it (and is installed); else an MlxcError saying what to do."""
    from ..api import SourceKind, resolve

    source = resolve(src)
    if source.kind not in (SourceKind.HF_DIR, SourceKind.GGUF, SourceKind.HUB):
        raise MlxcError(f"transformers cannot load a {source.kind.value} ({source.location}); compare it with another "
                        "mlxc source instead (mlxc diff SRC SRC2)")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MlxcError("comparing with transformers needs transformers and torch (pip install transformers torch); "
                        "or give a second source to compare two mlxc models") from None
    return source


_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
                 "token_classification": "AutoModelForTokenClassification"}


def load_transformers(src, head: str = "causal_lm") -> object:
    """The transformers model (float32, eval) of a Hugging Face directory, a GGUF file, a hub id or `pkg:` name, with
    the task head mlxc's model has (`head`: a HeadKind value), so both compute the same outputs."""
    import torch
    import transformers

    from ..api import SourceKind, download

    source = _transformers_source(src)
    path = Path(download(source.location)) if source.kind == SourceKind.HUB else Path(source.location)
    kwargs = dict(dtype=torch.float32)
    if source.kind == SourceKind.GGUF:
        where, kwargs["gguf_file"] = str(path.parent), path.name
    else:  # safetensors only: a pytorch_model.bin is a pickle, and mlxc never unpickles what it is given
        where, kwargs["use_safetensors"] = str(path), True
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = getattr(transformers, _AUTO_CLASSES[head]).from_pretrained(where, **kwargs)
    except Exception as e:  # transformers raises many kinds; the first line says what went wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise MlxcError(f"transformers could not load {source.location}: {type(e).__name__}: {first}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def transformers_hidden_states(hf_model, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The same tensors from a transformers causal LM, through forward hooks (their outputs, whatever the version
    returns: a tensor, or a tuple whose first element is the hidden state)."""
    import torch

    base = hf_model.base_model
    layers = list(getattr(base, "layers", None) or getattr(base, "h", None) or getattr(base, "blocks", None) or [])
    # Phi names the final norm final_layernorm, BLOOM ln_f, MPT norm_f
    norm = next((m for m in (getattr(base, n, None) for n in ("norm", "final_layernorm", "ln_f", "norm_f"))
                 if m is not None), None)
    if not layers or norm is None:
        raise MlxcError(f"{type(hf_model).__name__}: cannot find its decoder layers and final norm to hook")
    captured: dict[str, np.ndarray] = {}

    def hook(label: str):
        def record(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            captured[label] = t.detach().float().numpy()

        return record

    modules = [(EMBEDDINGS, hf_model.get_input_embeddings())]
    modules += [(f"layers.{i}", layer) for i, layer in enumerate(layers)] + [(NORM, norm)]
    handles = [m.register_forward_hook(hook(label)) for label, m in modules]
    try:
        with torch.no_grad():
            logits = hf_model(torch.tensor([list(ids)], dtype=torch.long)).logits
    finally:
        for h in handles:
            h.remove()
    out = {label: captured[label] for label, _ in modules}
    out[LOGITS] = logits.float().numpy()
    return out


# ---------------------------------------------------------------------------------------------------- compare


def default_tokens(vocab_size: int, n: int = 16) -> list[int]:
    """A short fixed sequence spread over the vocabulary, so a run is reproducible without a tokenizer."""
    return [(1 + 7919 * i) % vocab_size for i in range(n)]


def compare(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], order: Sequence[str],
            tol: float, layers: Mapping[str, int]) -> list[Row]:
    """One row per label in `order`: max |candidate - reference| and that relative to max |reference|."""
    rows = []
    for label in order:
        a, b = candidate[label], reference[label]
        if a.shape != b.shape:
            raise MlxcError(f"{label}: shapes differ ({list(a.shape)} vs {list(b.shape)}): not the same architecture")
        max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if not math.isfinite(max_abs):
            rel = math.nan
        rows.append(Row(label, layers.get(label), max_abs, rel, tol))
    return rows


def _tokens(model, tokens: Optional[Sequence[int]], prompt: Optional[str]) -> list[int]:
    if tokens is not None and prompt is not None:
        raise MlxcError("give token ids (--tokens) or a prompt (--prompt), not both")
    if prompt is not None:
        if model.tokenizer is None:
            raise MlxcError(f"{model.source} has no tokenizer to encode --prompt; give --tokens instead")
        ids = model.tokenizer.encode(prompt)
        if not ids:
            raise MlxcError("--prompt encodes to no tokens")
        return list(ids)
    if tokens is not None:
        ids = [int(t) for t in tokens]
        if not ids:
            raise MlxcError("--tokens is empty")
        return ids
    return default_tokens(model.vocab_size)


def _note(progress: Progress, msg: str) -> None:
    if progress:
        progress(msg)


def diff(src, src2=None, *, tokens: Optional[Sequence[int]] = None, prompt: Optional[str] = None,
         tol: Optional[float] = None, options: Optional[dict] = None, options2: Optional[dict] = None,
         reference=None, progress: Progress = None) -> DiffReport:
    """Compare `src` compiled by mlxc with transformers (or with `src2` compiled by mlxc), layer by layer.

    `options` / `options2` are `mlxc.load` keyword arguments for each side (dtype, passes, quantize, group_size).
    `reference` is a transformers model already in memory, used instead of loading `src` with transformers.
    `tol` bounds the relative error of every row (default by dtype: 1e-4 for float32).
    """
    from ..api import load

    if tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise MlxcError(f"--tol must be a finite number >= 0, got {tol}")
    if src2 is None and options2:
        raise MlxcError(f"{', '.join(sorted(options2))} for a second model only apply when SRC2 is given")
    if src2 is not None and reference is not None:
        raise MlxcError("give a second source or a transformers reference model, not both")
    if src2 is None and reference is None:
        _transformers_source(src)  # before any work: can the reference be had at all?
    _note(progress, f"loading {src}")
    model = load(src, **(options or {}))
    ids = _tokens(model, tokens, prompt)
    model.check_ids(ids)
    probe = HiddenStateProbe(model)
    dtypes = [model.dtype]
    if src2 is not None:
        _note(progress, f"loading {src2}")
        other = load(src2, **(options2 or {}))
        if other.vocab_size != model.vocab_size:
            raise MlxcError(f"the vocabularies differ ({model.vocab_size} vs {other.vocab_size} tokens): "
                            "not the same model")
        other_probe = HiddenStateProbe(other)
        if len(other_probe.labels) != len(probe.labels):
            raise MlxcError(f"{src} exposes {len(probe.labels)} hidden states ({len(probe.layers)} layers) and {src2} "
                            f"{len(other_probe.labels)} ({len(other_probe.layers)} layers): not the same architecture")
        dtypes.append(other.dtype)
        _note(progress, f"running both on {len(ids)} tokens")
        ref, cand = probe(ids), other_probe(ids)
        # the second model's rows carry the first model's labels (the layers correspond in order)
        ref_labels = probe.labels + [LOGITS]
        cand = dict(zip(ref_labels, [cand[label] for label in other_probe.labels + [LOGITS]]))
        ref_name, cand_name = f"mlxc {src}", f"mlxc {src2}"
    else:
        head = model.spec.head.kind.value if model.spec is not None else "causal_lm"
        hf_model = reference if reference is not None else _load_reference(src, progress, head)
        _note(progress, f"running mlxc and transformers on {len(ids)} tokens")
        cand, theirs = probe(ids), transformers_hidden_states(hf_model, ids)
        n_layers = sum(label.startswith("layers.") for label in theirs)
        if n_layers != len(probe.layers):
            raise MlxcError(f"mlxc's program calls {len(probe.layers)} layers and transformers' model has {n_layers}")
        # transformers' layers correspond to mlxc's layer calls in order
        hf_layer_labels = [f"layers.{i}" for i in range(n_layers)]
        mapping = dict(zip(probe.layers, hf_layer_labels))
        ref = {label: theirs[mapping.get(label, label)] for label in probe.labels + [LOGITS]}
        ref_name, cand_name = f"transformers {src}", f"mlxc {src}"
    if tol is None:
        tol = max(DEFAULT_TOL.get(d, 1e-2) for d in dtypes)
    rows = compare(cand, ref, probe.labels + [LOGITS], tol, probe.layers)
    return DiffReport(cand_name, ref_name, ids, tol, rows)


def _load_reference(src, progress: Progress, head: str = "causal_lm"):
    _note(progress, f"loading {src} with transformers")
    return load_transformers(src, head)
