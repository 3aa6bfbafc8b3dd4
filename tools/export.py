"""`mlxc export`: any source as a Hugging Face checkpoint (config.json, safetensors, tokenizer files).

The checkpoint is the plain program's parameters (what `lower(spec)` declares, by global name), in float. They are
found among the values of a compiled program: a source is built without optimization passes and its load-time
`derive` ops (layout ops such as GGUF's row order) run forwards from the frontend's tensors; a compiled artifact
stores what its ops produced (a fused `qkv_proj`, a quantized weight), so the invertible ones run backwards too
(concat -> split, split -> concat, transpose, reshape, quantize/dequantize/cast -> float). A weight that only an
irreversible op reaches (a merged LoRA `add`) cannot be recovered and the export is refused, writing nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional

import mlx.core as mx

from ..files import replacing_dir
from ..frontends.hf import hf_config_from_spec, ir_to_hf_name
from ..frontends.lower import lower
from ..frontends.spec import ModelSpec
from ..ir import DType, Operation, Program, TensorType
from ..ir.errors import MlxcError
from ..runtime import weights as W

Progress = Optional[Callable[[str], None]]
FORMATS = ("hf",)
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size
_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _torch_name(ir_dtype: str) -> str:
    """A manifest records the IR's dtype name (f32); Hugging Face configs use torch's (float32)."""
    name = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(ir_dtype, ir_dtype)
    if name not in _MX:
        raise MlxcError(f"the artifact's manifest gives dtype {ir_dtype!r}, which is not a float dtype")
    return name


# ------------------------------------------------------------------------------------- undoing load-time ops


def _float(x: W.Tensor) -> mx.array:
    return x.dequantize() if isinstance(x, W.QuantizedTensor) else x


def _split_rows(x: W.Tensor, sizes: list[int], axis: int) -> list[W.Tensor]:
    """Split along `axis`; quantized rows split exactly (each row's groups travel with it)."""
    cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    if isinstance(x, W.QuantizedTensor) and axis % len(x.shape) != len(x.shape) - 1:
        parts = [mx.split(getattr(x, f), cuts, axis=axis) for f in ("codes", "scales", "biases")]
        return [W.QuantizedTensor(c, s, b, x.quant) for c, s, b in zip(*parts)]
    return mx.split(_float(x), cuts, axis=axis)


def _inverse_perm(perm: list[int]) -> list[int]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return out


def _undo(op: Operation, results: list[W.Tensor]) -> Optional[list[W.Tensor]]:
    """The operands of a load-time op from its results, or None when the op loses information."""
    kind, attrs = op.op, op.attrs
    if kind == "concat":
        sizes = [v.type.shape[attrs["axis"]] for v in op.operands]
        return _split_rows(results[0], sizes, attrs["axis"])
    if kind == "split":
        return [mx.concatenate([_float(r) for r in results], axis=attrs["axis"])]
    if kind == "stack":  # per-expert tensors from the stacked experts
        stacked = _float(results[0])
        return [x.squeeze(attrs["axis"]) for x in mx.split(stacked, stacked.shape[attrs["axis"]], axis=attrs["axis"])]
    if kind in ("quantize", "dequantize", "cast"):
        return [_float(results[0])]  # the operand as the model computes with it (a float weight)
    if kind == "shift":  # a Gemma norm's gain 1 + w
        return [_float(results[0]) - attrs["value"]]
    if kind == "transpose":
        return [_float(results[0]).transpose(*_inverse_perm(list(attrs["perm"])))]
    if kind == "reshape" and all(isinstance(d, int) for d in op.operands[0].type.shape):
        return [_float(results[0]).reshape(*op.operands[0].type.shape)]
    return None


def recover(program: Program, known: Mapping[str, W.Tensor]) -> tuple[dict[str, W.Tensor], dict[str, Operation]]:
    """Every value of `program` (by global name: parameters and load-time results) that follows from `known` by
    running its load-time ops forwards and the invertible ones backwards, until nothing more follows.

    Returns the values and, for values that stay unknown because an irreversible op produced what is known from
    them, that op."""
    from ..runtime.derive import run_op

    values: dict[str, W.Tensor] = {}
    blocked: dict[str, Operation] = {}
    for prefix, fn in program.call_paths():
        every = fn.params + [r for o in fn.derived for r in o.results]
        env = {id(v): known[prefix + v.name] for v in every if prefix + v.name in known}
        stuck: dict[int, Operation] = {}
        grew = True
        while grew:
            grew = False
            for op in reversed(fn.derived):  # backwards: operands from results
                if not all(id(r) in env for r in op.results) or all(id(v) in env for v in op.operands):
                    continue
                operands = _undo(op, [env[id(r)] for r in op.results])
                if operands is None:
                    for v in op.operands:
                        stuck.setdefault(id(v), op)
                    continue
                for v, x in zip(op.operands, operands):
                    if id(v) not in env:
                        env[id(v)], grew = x, True
            for op in fn.derived:  # forwards: results from operands
                if all(id(r) in env for r in op.results) or not all(id(v) in env for v in op.operands):
                    continue
                try:
                    outs = run_op(op, [env[id(v)] for v in op.operands])
                except MlxcError:
                    continue
                for r, x in zip(op.results, outs):
                    env.setdefault(id(r), x)
                grew = True
        for v in every:
            if id(v) in env:
                values.setdefault(prefix + v.name, env[id(v)])
            elif id(v) in stuck:
                blocked.setdefault(prefix + v.name, stuck[id(v)])
    return values, blocked


def artifact_values(path: Path) -> tuple[ModelSpec, dict[str, W.Tensor], dict[str, Operation], object]:
    """An artifact's spec, the values its stored tensors determine (see `recover`), what blocked the others, and
    its tokenizer."""
    from ..api import _load_tokenizer
    from ..runtime import artifact as art

    manifest = art.read_manifest(path)
    from ..plugins import check_required

    check_required(manifest.plugins, str(path))  # its program and spec may name a plugin's ops and block kinds
    if not manifest.spec:
        raise MlxcError(f"{path}: the manifest records no model spec, so there is no config to export")
    if manifest.lora:  # recorded only for adapters that stayed unmerged
        raise MlxcError(f"{path} has unmerged LoRA adapters, which a Hugging Face checkpoint cannot hold: export "
                        f"the base model ({manifest.source}) and save the adapters as a PEFT folder "
                        "(mlxc.save_adapter), or compile with --merge-lora")
    program = art.read_program(path)
    params = W.stage_parameters(program, "stored")
    arrays = W.read_safetensors([path / art.WEIGHTS_FILE])
    missing = [n for n, p in params.items() if n not in arrays]
    if missing:
        raise MlxcError(f"{path / art.WEIGHTS_FILE} lacks tensor {missing[0]}")
    values, blocked = recover(program, W.from_storage(params, arrays))
    return ModelSpec.model_validate(manifest.spec), values, blocked, _load_tokenizer(path)


# ------------------------------------------------------------------------------------------------- writing


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MlxcError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise MlxcError(f"{out} already exists (use --force to replace it)")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise MlxcError(f"{out} exists and is not a Hugging Face checkpoint; refusing to replace it")


def _shards(tensors: dict[str, mx.array], limit: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    return shards


def _write_weights(tmp: Path, tensors: dict[str, mx.array], limit: int) -> list[str]:
    shards = _shards(tensors, limit)
    if len(shards) == 1:
        mx.save_safetensors(str(tmp / "model.safetensors"), shards[0], metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _write_tokenizer(tmp: Path, tokenizer, spec: ModelSpec) -> list[str]:
    """The tokenizer's files as mlxc saves them, marked as a plain fast tokenizer so that transformers uses
    tokenizer.json as it is rather than rebuilding a model-specific pipeline; and the generation ids."""
    written = []
    if tokenizer is not None:
        written = tokenizer.save(tmp)
        config_file = tmp / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if tokenizer.chat_template is not None:
            config["chat_template"] = tokenizer.chat_template  # transformers 4 reads it only from here
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    eos = list(getattr(tokenizer, "eos_token_ids", None) or spec.eos_token_ids)
    generation = {"bos_token_id": spec.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                  "pad_token_id": spec.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return sorted(set(written) | {"generation_config.json"})


# ------------------------------------------------------------------------------------------------- export


def _hf_tensors(spec: ModelSpec, values: Mapping[str, W.Tensor], blocked: Mapping[str, Operation], dtype: str,
                where: str, family: str) -> dict[str, mx.array]:
    """The plain (unfused, float) program's parameters under transformers' names, in its order, taken from the
    values of the compiled program that carry the same global names. A family whose checkpoints lay tensors out
    differently (Phi-3's fused `qkv_proj`) gets them in that layout, found by running its layout ops backwards."""
    from ..frontends.families import family as family_named
    from ..passes.checkpoint_layout import CheckpointLayout

    program = lower(spec, DType.parse(dtype))
    rules = family_named(family).checkpoint_layout(spec)
    if rules:
        program, _ = CheckpointLayout(rules=rules).run(program)
        values = {**recover(program, values)[0], **values}
    out = {}
    for name, p in program.parameters():
        if name not in values:
            op = blocked.get(name)
            why = (f"it is stored only through load-time op `{op.op}` (%{op.results[0].name}), which cannot be "
                   "undone" if op is not None else "no stored tensor determines it")
            raise MlxcError(f"cannot export {where}: weight {name}: {why}; export the source it was compiled from")
        t = values[name]
        if tuple(t.shape) != tuple(p.type.shape):
            raise MlxcError(f"weight {name} has shape {list(t.shape)}, the model needs {list(p.type.shape)}")
        out[ir_to_hf_name(name, family)] = W.conform(t, TensorType(p.type.dtype, p.type.shape))
    return out


def export(src, out_dir, format: str = "hf", *, dtype: Optional[str] = None, overwrite: bool = False,
           random_init: bool = False, seed: Optional[int] = None, init_scale: Optional[float] = None,
           max_shard_bytes: int = SHARD_BYTES, progress: Progress = None) -> Path:
    """Write `src` (any source mlxc reads, compiled artifacts included) as a Hugging Face checkpoint in `out_dir`.

    `dtype` is the tensors' dtype (default: float32, or an artifact's own). Sources without weights get the seeded
    random weights `mlxc.load` would give them. Nothing is written when the model cannot be expressed.
    """
    from ..api import SourceKind, build, resolve

    if format not in FORMATS:
        raise MlxcError(f"unknown export format {format!r}; supported: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _MX:
        raise MlxcError(f"unsupported dtype {dtype!r}; expected float32, float16 or bfloat16")
    out = Path(out_dir)
    _check_destination(out, overwrite)
    source = resolve(src)
    if source.kind == SourceKind.ARTIFACT:
        used = [f for f, v in (("--random-init", random_init), ("--init-seed", seed), ("--init-scale", init_scale))
                if v not in (None, False)]
        if used:
            raise MlxcError(f"{source.location} is a compiled artifact with its own weights, so {', '.join(used)} "
                            "cannot apply to it")
        from ..runtime import artifact as art

        spec, values, blocked, tokenizer = artifact_values(Path(source.location))
        dtype = dtype or _torch_name(art.read_manifest(Path(source.location)).dtype)
        config = hf_config_from_spec(spec, dtype)
    else:
        # no optimization passes: the checkpoint's tensors and only the layout ops its frontend asks for
        b = build(src, dtype, passes=[], random_init=random_init, seed=seed, init_scale=init_scale)
        spec, tokenizer, dtype = b.front.spec, b.front.tokenizer, dtype or "float32"
        config = hf_config_from_spec(spec, dtype)
        values, blocked = recover(b.program, b.tensors)
    if progress:
        progress(f"read {spec.name} ({source.kind.value})")
    hf_tensors = _hf_tensors(spec, values, blocked, dtype, source.location, config["model_type"])
    if progress:
        progress(f"writing {len(hf_tensors)} tensors ({sum(a.nbytes for a in hf_tensors.values()) / 2**20:.0f} MiB)")
    with replacing_dir(out) as tmp:
        _write_weights(tmp, hf_tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(tmp, tokenizer, spec)
    return out
