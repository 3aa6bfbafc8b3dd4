"""A model split over the ranks of an `mx.distributed` group: each rank compiles its share and reads only its weights.

`load_parallel(src, "tensor" | "pipeline")` runs on every rank of a group (started by `mlxc ... --ranks N` or by
`mlx.launch`): it joins the group, compiles the program with the `shard` pass for this rank, reads from the
checkpoint only the tensors and slices that share needs (`passes.shard.loading_program` says which), and returns a
model every rank calls alike. `program_for_rank` is the same compile without weights, for `mlxc dump --ranks N`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from . import api
from .frontends.lower import lower
from .frontends.spec import ModelSpec
from .ir import Program
from .ir.errors import MlxcError
from .passes.pipeline import run_pipeline
from .passes.shard import MODES, Shard, loading_program, place
from .runtime import distributed
from .runtime import slices as S
from .runtime import weights as W
from .runtime.budget import release_free_memory

_UNSUPPORTED = {"adapter": "--adapter", "lora": "lora=", "merge_lora": "--merge-lora"}


def _check(parallel: str, source: api.Source, **options) -> None:
    if parallel not in MODES:
        raise MlxcError(f"unknown --parallel {parallel!r}; expected one of {', '.join(MODES)}")
    if source.kind == api.SourceKind.ARTIFACT:
        raise MlxcError(f"{source.location} is a compiled artifact, which stores whole (fused) weights; split "
                        "models compile from the source (checkpoint, GGUF, preset or spec) so each rank reads only "
                        "its share")
    used = [flag for key, flag in _UNSUPPORTED.items() if options.get(key)]
    if used:
        raise MlxcError(f"{', '.join(used)} cannot be used with --parallel yet (LoRA adapters are not divided among "
                        "ranks); merge the adapter into a checkpoint first")


def _compile(front: api.Frontend, parallel: str, ranks: int, rank: int, dtype, passes, quantize, group_size,
             kernels=None, **kw) -> tuple[Program, list]:
    items = api._pipeline(front, passes, quantize, group_size, None, False, **({"kernels": kernels} if kernels else {}))
    shard = Shard(ranks=ranks, rank=rank, mode=parallel, align=(group_size or 64) if quantize else 1)
    program = run_pipeline(lower(front.spec, api._float_dtype(dtype or "float32")), place(items, shard), **kw)
    return program, items


def program_for_rank(src, parallel: str, ranks: int, rank: int = 0, dtype: str | None = None, *, passes=None,
                     quantize: int | None = None, group_size: int | None = None, on_report=None,
                     stop_after: str | None = None, **options) -> Program:
    """Rank `rank`'s program of a model split `parallel`-wise over `ranks` ranks (no weights read)."""
    source = api.resolve(src)
    _check(parallel, source, **options)
    if not 0 <= rank < ranks:
        raise MlxcError(f"--rank {rank} is not one of the {ranks} ranks (0..{ranks - 1})")
    front = api.Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else \
        api.read_source(source, weights=False)
    return _compile(front, parallel, ranks, rank, dtype, passes, quantize, group_size, options.get("kernels"),
                    on_report=on_report, stop_after=stop_after)[0]


def load_parallel(src, parallel: str, dtype: str | None = None, *, passes=None, quantize: int | None = None,
                  group_size: int | None = None, random_init: bool = False, seed: int | None = None,
                  init_scale: float | None = None, progress=None, argv=(), **options) -> distributed.DistributedModel:
    """This rank's share of `src`, split `parallel`-wise over the group this process was launched in."""
    source = api.resolve(src)
    _check(parallel, source, **options)
    state = distributed.join(argv)
    t = time.perf_counter()
    # a GGUF's tensors are read by slice below (its reader would load every tensor); a safetensors checkpoint's
    # are opened lazily, for their names and types
    front = api.Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else \
        api.read_source(source, weights=source.kind != api.SourceKind.GGUF)
    t = api._stage(progress, f"read {front.description}", t)
    program, items = _compile(front, parallel, state.size, state.rank, dtype, passes, quantize, group_size,
                              options.get("kernels"))
    loading, reads = loading_program(program)
    t = api._stage(progress, f"rank {state.rank} of {state.size}: {parallel} share compiled", t)
    tensors = _read(front, source, reads, items, dtype, random_init, seed, init_scale)
    # under mlxc's launcher the module goes in the job's directory: the shared module cache evicts files that
    # other processes may be about to import
    module_path = api.write_module(api.generate_module(
        loading, title=f"{front.spec.name}: rank {state.rank} of {state.size} ({parallel} parallel), compiled by "
                       f"mlxc from {front.description}."), os.environ.get(distributed.JOB_DIR))
    module = api.import_module(module_path)
    net = api._instantiate(module, W.bind(loading, tensors), loading)
    del tensors  # the shares as read (the model holds what it runs on)
    release_free_memory()
    api._stage(progress, f"rank {state.rank}: weights bound", t)
    return distributed.DistributedModel(module, net, loading, spec=front.spec, tokenizer=front.tokenizer,
                                        source=str(src if not isinstance(src, ModelSpec) else src.name),
                                        module_path=str(module_path), vocab_size=front.spec.vocab_size,
                                        parallel=parallel, rank=state)


def _read(front: api.Frontend, source: api.Source, reads: dict, items, dtype, random_init, seed, init_scale) -> dict:
    """The rank's tensors by its program's global names: slices read from the checkpoint files (safetensors or
    GGUF), or drawn as the single process draws random weights."""
    real = source.kind in (api.SourceKind.HF_DIR, api.SourceKind.HUB, api.SourceKind.GGUF)
    if not real or random_init:
        whole = run_pipeline(lower(front.spec, api._float_dtype(dtype or "float32")), items)
        wanted = defaultdict(list)
        for r in reads.values():
            wanted[r.name].append((r.axis, r.start, r.stop))
        drawn = S.random_shares(((n, tuple(p.type.shape)) for n, p in whole.parameters()), wanted,
                                seed=seed or 0, scale=0.02 if init_scale is None else init_scale)
        return {name: drawn[(r.name, r.axis, r.start, r.stop)] for name, r in reads.items()}
    if seed is not None or init_scale is not None:
        raise MlxcError("--init-seed / --init-scale set random weights, but this source has real ones; "
                        "add --random-init to replace them")
    files = _gguf(source) if source.kind == api.SourceKind.GGUF else _safetensors(front, source)
    if files is not None:
        return {name: files.read(r.name, r.axis, r.start, r.stop) for name, r in reads.items()}
    out = {}
    for name, r in reads.items():
        if r.name not in front.tensors:
            raise W.WeightError(f"missing tensor for parameter {r.name}")
        out[name] = S.take(front.tensors[r.name], r.axis, r.start, r.stop)
    return out


def _gguf(source: api.Source) -> S.GGUFSlices:
    """A GGUF file's tensors under the names `api.read_gguf_source` gives them (as stored: Q/K rows in the file's
    order, which the program's layout ops undo), read by slice."""
    from .frontends import gguf

    ckpt = gguf.read_gguf(source.location)
    tensors, native, kept = {}, {}, W.gguf_native_types(ckpt)
    for n, info in ckpt.tensor_infos.items():
        ir = ckpt.ir_name(n)
        if ir is None:
            continue
        name = gguf.stored_name(ckpt, ir)
        tensors[name] = (info.ggml_type, tuple(info.shape), info.offset)
        if n in kept:
            native[name] = kept[n]
    return S.GGUFSlices(Path(source.location), tensors, native)


def _safetensors(front: api.Frontend, source: api.Source) -> S.SafetensorsSlices | None:
    """A Hugging Face checkpoint's tensors under the program's names, read by slice from the files (None for
    other sources)."""
    from .frontends import hf

    if source.kind == api.SourceKind.HF_DIR:
        path = Path(source.location)
    elif source.kind == api.SourceKind.HUB:
        path = api.cached_snapshot(source.location) or api.download(source.location, True, source.preset)
    else:
        return None
    family = front.detection.family if front.detection is not None else front.spec.family
    tied = front.spec.tie_word_embeddings

    def rename(name: str) -> str | None:
        ir = hf.hf_to_ir_name(name, family)
        if ir is hf.UNMAPPED:
            raise W.WeightError(f"unexpected tensor {name} in checkpoint: it matches no parameter of this "
                                "architecture")
        return None if ir is None or (tied and ir == "lm_head.weight") else ir

    return S.SafetensorsSlices(W.safetensors_files(path), rename)
