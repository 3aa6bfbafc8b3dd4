"""GGUF checkpoints (llama.cpp's single-file format): metadata to ModelSpec, tensors to IR names, and the tokenizer.

    ckpt = read_gguf("model.Q4_1.gguf")          # header, metadata and tensor table; data stays memory-mapped
    ckpt.spec                                     # the ModelSpec
    tensors = gguf_tensors(ckpt)                  # IR-named mx.arrays, quantized types dequantized to float
    tok = gguf_tokenizer(ckpt)                    # TokenizerParts from the metadata (runtime: Tokenizer.from_parts)

This is the float path: every tensor comes out as a float array in the layout our IR (Hugging Face's) uses.
Two llama.cpp conventions are undone on the way:
- GGUF lists dimensions fastest-first (`ne`), the reverse of numpy; the reader already gives numpy order.
- For the `llama` architecture llama.cpp's converter permutes the rows of Q and K within each head from the
  half-split rotary layout (HF) to the interleaved one (its `rope` kernel); we permute them back.

Each family file declares its GGUF architecture (a `GGUFArch`: llama.cpp's tensor names and, where needed, the extra
metadata it reads); pre-tokenizers are a table here (`_PRE_TOKENIZERS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Final, Iterable, Mapping, Optional, Union

import mlx.core as mx
import numpy as np
from pydantic import ValidationError

from ..ir.attrs import RopeKind
from ..ir.errors import MlxcError
from ..ir.layout import DeinterleaveRows, LayoutRule
from .spec import ModelSpec, RopeSpec
from .spec_file import validation_message

PathLike = Union[str, Path]

GGUF_MAGIC: Final = b"GGUF"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ------------------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` maps onto a family.

    `tensor_rules`: (GGUF name regex, IR name template); a template of None drops the tensor. `permute_qk`: the
    converter stored Q/K rows in llama.cpp's interleaved rotary order (undone by a load-time op). `spec_fields`:
    the family's metadata beyond the common keys, given the metadata, the tensor table and the common fields.
    `layout`: other ways the converter stores tensors (Gemma's norms as 1 + w), as checkpoint-layout rules.
    """

    name: str
    family: str
    tensor_rules: tuple[tuple[re.Pattern[str], Optional[str]], ...]
    permute_qk: bool = False
    spec_fields: Optional[Callable[["GGUFMetadata", dict[str, Any]], dict[str, Any]]] = None
    layout: Optional[Callable[[ModelSpec], tuple[LayoutRule, ...]]] = None


def tensor_rules(*pairs: tuple[str, Optional[str]]) -> tuple[tuple[re.Pattern[str], Optional[str]], ...]:
    return tuple((re.compile(p), t) for p, t in pairs)


# llama.cpp's names for the tensors every decoder family shares (a family adds its own rows).
COMMON_TENSORS: Final = (
    (r"token_embd\.weight", "embed_tokens.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.input_norm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"layers.\1.attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"layers.\1.attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"layers.\1.attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    # Precomputed rotary tables some converters write; we recompute them from the spec.
    (r"blk\.(\d+)\.attn_rot_embd", None),
)


def architectures() -> dict[str, GGUFArch]:
    """Every family's GGUF architecture, by `general.architecture`."""
    from .families import all_families

    return {f.gguf.name: f.gguf for f in all_families() if f.gguf is not None}


def _supported() -> str:
    """In the families' order (Llama first), as the Hugging Face reader lists them."""
    return ", ".join(architectures())


# ---------------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is in numpy order (GGUF's `ne` reversed); `ggml_type` e.g. 'Q4_1'."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A parsed GGUF file. Tensor data stays memory-mapped until `tensor()` / `gguf_tensors` reads it."""

    path: Path
    spec: ModelSpec
    architecture: str
    metadata: Mapping[str, Any] = field(repr=False)  # every key/value pair, decoded to Python values
    tensor_infos: Mapping[str, GGUFTensorInfo] = field(repr=False)  # by GGUF tensor name, in file order
    _reader: Any = field(repr=False, compare=False)
    _index: Mapping[str, int] = field(repr=False, compare=False, default_factory=dict)

    @property
    def arch(self) -> GGUFArch:
        return architectures()[self.architecture]

    def ir_name(self, gguf_name: str) -> Optional[str]:
        """The IR parameter name of a GGUF tensor, None if deliberately dropped; MlxcError if unknown."""
        return _ir_name(self.arch, gguf_name, self.path)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data as the reader maps it (quantized types: uint8 blocks, numpy-ordered rows)."""
        try:
            return self._reader.tensors[self._index[name]].data
        except KeyError:
            raise MlxcError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """A tensor by GGUF name as float32 numpy, in the file's own layout (no Q/K un-permutation)."""
        return _to_numpy_float(self, name)


def _reader_class():
    """GGUFReader, with its per-field slicing done on a plain ndarray view of the memmap.

    The stock reader slices an `np.memmap` once per metadata element; memmap's `__array_finalize__` makes that
    about three times slower for a 49k-token vocabulary (3 s vs 1 s). The view shares the mapping, so tensor data
    is still read lazily from the file.
    """
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):  # same contract as GGUFReader._get
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            itemsize = np.dtype(dtype).itemsize
            arr = plain[offset : offset + itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return _Reader


def _open_reader(path: Path):
    if not path.exists():
        raise MlxcError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise MlxcError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise MlxcError(f"cannot read {path}: {e.strerror or e}") from None
    if head[:4] != GGUF_MAGIC:
        raise MlxcError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 8:
        raise MlxcError(f"{path} is truncated: it ends inside the GGUF header")
    size = path.stat().st_size
    try:
        reader = _reader_class()(str(path))
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError/... on damaged headers
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise MlxcError(
            f"{path} is truncated or corrupt: its GGUF header could not be parsed ({detail}); "
            f"the file is {size} bytes"
        ) from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise MlxcError(f"{path} is truncated: its tensor data needs {end} bytes but the file has {size}")
    return reader


def _field_value(fld) -> Any:
    """A metadata value as Python: str, int, float, bool or a list of them. FLOAT32 gets its shortest repr."""
    from gguf import GGUFValueType

    types = fld.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) < 2 or not fld.data:
            return []
        if types[1] == GGUFValueType.STRING:
            return [fld.parts[i].tobytes().decode("utf-8", errors="replace") for i in fld.data]
        if types[1] == GGUFValueType.ARRAY:
            return fld.contents()  # nested arrays: rare, let the reader decode them
        values = np.concatenate([fld.parts[i] for i in fld.data]) if len(fld.data) > 1 else fld.parts[fld.data[0]]
        return values.tolist()
    if types[0] == GGUFValueType.STRING:
        return fld.parts[fld.data[0]].tobytes().decode("utf-8", errors="replace")
    value = fld.parts[fld.data[0]][0]
    if types[0] == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # 9.999999747e-06 -> 1e-05, as the converter wrote it
    if types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value.item()


def read_gguf(path: PathLike, name: Optional[str] = None) -> GGUFCheckpoint:
    """Parse a GGUF file's header: metadata, tensor table and the ModelSpec. Tensor data is not read.

    `name` names the spec; it defaults to the file name without `.gguf`.
    """
    p = Path(path).expanduser()
    reader = _open_reader(p)
    try:
        metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:
        raise MlxcError(f"{p}: malformed metadata ({type(e).__name__}: {e})") from None
    infos = {
        t.name: GGUFTensorInfo(
            name=t.name,
            ggml_type=t.tensor_type.name,
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            n_bytes=int(t.n_bytes),
            offset=int(t.data_offset),
        )
        for t in reader.tensors
    }
    architecture = metadata.get("general.architecture")
    known = architectures()
    if architecture not in known:
        raise MlxcError(
            f"{p}: unsupported GGUF architecture {architecture!r} (general.architecture); supported: {_supported()}"
        )
    spec = _spec(known[architecture], metadata, infos, name or p.name.removesuffix(".gguf"), p)
    index = {t.name: i for i, t in enumerate(reader.tensors)}
    return GGUFCheckpoint(p, spec, architecture, metadata, infos, reader, index)


# ------------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class GGUFMetadata:
    """What a family's `spec_fields` hook reads: the metadata (keys under the architecture's prefix via `get`), the
    tensor table and the file, for error messages."""

    arch: str
    metadata: Mapping[str, Any]
    tensors: Mapping[str, GGUFTensorInfo]
    path: Path

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def has_tensor(self, pattern: str) -> bool:
        return any(re.fullmatch(pattern, n) for n in self.tensors)

    def error(self, message: str) -> MlxcError:
        return MlxcError(f"{self.path}: {message}")


def _spec(arch: GGUFArch, md: Mapping[str, Any], infos: Mapping[str, GGUFTensorInfo], name: str,
          path: Path) -> ModelSpec:
    a = arch.name

    def need(key: str) -> Any:
        value = md.get(f"{a}.{key}")
        if value is None:
            raise MlxcError(f"{path}: missing required metadata key `{a}.{key}`")
        return value

    hidden = need("embedding_length")
    heads = need("attention.head_count")
    kv_heads = md.get(f"{a}.attention.head_count_kv") or heads
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise MlxcError(f"{path}: per-layer head counts are not supported")
    head_dim = md.get(f"{a}.attention.key_length")
    rope_dim = md.get(f"{a}.rope.dimension_count")
    dim = head_dim or (hidden // heads if heads else None)
    partial = rope_dim / dim if rope_dim is not None and dim and rope_dim != dim else 1.0
    value_length = md.get(f"{a}.attention.value_length")
    if value_length is not None and dim is not None and value_length != dim:
        raise MlxcError(f"{path}: attention.value_length {value_length} differs from key_length {dim}")

    tokens = md.get("tokenizer.ggml.tokens")
    vocab = md.get(f"{a}.vocab_size") or (len(tokens) if tokens else None)
    embd = infos.get("token_embd.weight")
    if embd is None:
        raise MlxcError(f"{path}: no token_embd.weight tensor")
    if vocab is None:
        vocab = embd.shape[0]
    if embd.shape != (vocab, hidden):
        raise MlxcError(f"{path}: token_embd.weight has shape {list(embd.shape)}, expected [{vocab}, {hidden}]")
    if "rope_freqs.weight" in infos:
        raise MlxcError(
            f"{path}: this file stores per-dimension rotary frequency factors (rope_freqs.weight, used for "
            "Llama 3.1-style rope scaling); mlxc cannot map them onto a rope spec yet"
        )
    eos = md.get("tokenizer.ggml.eos_token_id")
    eot = md.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(i for i in dict.fromkeys([eos, eot]) if i is not None)
    max_pos = md.get(f"{a}.context_length") or 4096
    fields: dict[str, Any] = dict(
        name=name,
        family=arch.family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        norm_eps=md.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        rope=_rope(a, md, max_pos, path),
        partial_rotary_factor=partial,
        attention_bias=any(re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", n) for n in infos),
        attention_out_bias=any(re.fullmatch(r"blk\.\d+\.attn_output\.bias", n) for n in infos),
        mlp_bias=any(re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.bias", n) for n in infos),
        tie_word_embeddings="output.weight" not in infos,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
    )
    if arch.spec_fields is not None:
        fields.update(arch.spec_fields(GGUFMetadata(a, md, infos, path), fields))
    try:
        return ModelSpec(**fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, str(path))) from None


def _rope(a: str, md: Mapping[str, Any], max_pos: int, path: Path) -> RopeSpec:
    theta = md.get(f"{a}.rope.freq_base", 10000.0)
    kind = md.get(f"{a}.rope.scaling.type")
    factor = md.get(f"{a}.rope.scaling.factor")
    if kind is None and factor not in (None, 0, 1, 1.0):  # old files: a bare linear factor
        kind = "linear"
    fields: dict[str, Any] = {"theta": theta}
    if kind in (None, "none"):
        pass
    elif kind == "linear":
        fields.update(kind=RopeKind.LINEAR, factor=factor or 1.0)
    elif kind == "yarn":
        original = md.get(f"{a}.rope.scaling.original_context_length") or max_pos
        fields.update(
            kind=RopeKind.YARN,
            factor=factor or max_pos / original,
            original_max_position_embeddings=original,
            beta_fast=md.get(f"{a}.rope.scaling.yarn_beta_fast") or 32.0,
            beta_slow=md.get(f"{a}.rope.scaling.yarn_beta_slow") or 1.0,
        )
        attn = md.get(f"{a}.rope.scaling.attn_factor")
        if attn is not None:
            fields["attention_factor"] = attn
    else:
        raise MlxcError(f"{path}: unsupported rope scaling type {kind!r} ({a}.rope.scaling.type)")
    try:
        return RopeSpec(**fields)
    except ValidationError as err:
        raise MlxcError(validation_message(err, f"{path} (rope)")) from None


# ---------------------------------------------------------------------------------------------------- tensors


def _ir_name(arch: GGUFArch, gguf_name: str, path: Path) -> Optional[str]:
    for pattern, template in arch.tensor_rules:
        m = pattern.fullmatch(gguf_name)
        if m:
            return None if template is None else m.expand(template)
    raise MlxcError(f"{path}: unexpected tensor {gguf_name}: it matches no parameter of the {arch.name} architecture")


_FLOAT_TYPES: Final = ("F32", "F16", "BF16")


def _to_numpy_float(ckpt: GGUFCheckpoint, name: str) -> np.ndarray:
    """float32 (or float16, kept as stored) numpy data of one tensor in numpy shape order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    info = ckpt.tensor_infos.get(name)
    if info is None:
        raise MlxcError(f"{ckpt.path}: no tensor named {name!r}")
    data = ckpt.raw(name)
    t = info.ggml_type
    if t == "F32":
        return np.asarray(data, dtype=np.float32).reshape(info.shape)
    if t == "F16":
        return np.asarray(data).view(np.float16).reshape(info.shape).astype(np.float32)
    if t == "BF16":
        u16 = np.asarray(data).view(np.uint16).reshape(info.shape).astype(np.uint32) << 16
        return u16.view(np.float32)
    try:
        out = dequantize(np.asarray(data), GGMLQuantizationType[t])
    except NotImplementedError:
        raise MlxcError(f"{ckpt.path}: tensor {name} has type {t}, which mlxc cannot dequantize") from None
    return out.reshape(info.shape)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1).

    The converter reshapes rows to (head, 2, d/2) and swaps the last two axes, interleaving the two rotary halves;
    reading the stored rows as (head, d/2, 2) and swapping back restores the half-split layout.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise MlxcError(f"cannot un-permute a Q/K tensor of {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_MX_DTYPES: Final = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16,
                     "f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


def _mx_dtype(dtype: Any) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    key = getattr(dtype, "value", dtype)
    if isinstance(key, str) and key.lower() in _MX_DTYPES:
        return _MX_DTYPES[key.lower()]
    raise MlxcError(f"unsupported dtype {dtype!r} for GGUF tensors; use float32, float16 or bfloat16")


def row_order(ckpt: GGUFCheckpoint, ir_name: str) -> Optional[np.ndarray]:
    """The row order that restores the HF layout of an IR tensor stored permuted (Q/K under llama.cpp's rope), or None."""
    arch, spec = ckpt.arch, ckpt.spec
    if not arch.permute_qk:
        return None
    if ir_name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
        heads, rows = spec.num_heads, spec.num_heads * spec.dim_per_head
    elif ir_name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
        heads, rows = spec.kv_heads, spec.kv_heads * spec.dim_per_head
    else:
        return None
    return _unpermute_rows(np.arange(rows), heads)


def layout(ckpt: GGUFCheckpoint) -> tuple[LayoutRule, ...]:
    """How the file's tensors differ from the Hugging Face layout the lowered program reads, for the
    `checkpoint-layout` pass: Q and K rows in llama.cpp's rotary order, for architectures whose converter permutes
    them, and the architecture's own rules (`GGUFArch.layout`). The tensors are named by `stored_name`."""
    own = tuple(ckpt.arch.layout(ckpt.spec)) if ckpt.arch.layout is not None else ()
    if not ckpt.arch.permute_qk:
        return own
    spec = ckpt.spec
    return own + tuple(DeinterleaveRows(f"{proj}.{leaf}", f"{proj}_interleaved.{leaf}", heads)
                       for proj, heads in (("q_proj", spec.num_heads), ("k_proj", spec.kv_heads))
                       for leaf in ("weight", "bias"))


def stored_name(ckpt: GGUFCheckpoint, ir_name: str) -> str:
    """The name a tensor goes by as stored (`layers.0.attn.q_proj_interleaved.weight`), per `layout`."""
    for rule in layout(ckpt):
        if ir_name == rule.param or ir_name.endswith("." + rule.param):  # `norm.weight` is @main's own
            return ir_name[: -len(rule.param)] + rule.stored
    return ir_name


def gguf_tensors(ckpt: GGUFCheckpoint, dtype: Any = None, skip: Iterable[str] = (),
                 as_stored: bool = False) -> dict[str, mx.array]:
    """Every tensor of the checkpoint as an IR-named `mx.array` in Hugging Face layout.

    F32/F16/BF16 keep their stored dtype, quantized types are dequantized to float32, unless `dtype` (an mx
    dtype, or 'float32' / 'float16' / 'bfloat16', or an mlxc DType) asks for one dtype. Q and K are un-permuted
    for architectures whose converter permutes them, unless `as_stored`: then they keep the file's row order under
    their `stored_name`, for a program that applies `layout`. With tied embeddings there is no `lm_head.weight`.
    """
    from gguf import GGMLQuantizationType

    want = _mx_dtype(dtype)
    arch = ckpt.arch
    spec = ckpt.spec
    # Check names and types before spending time dequantizing.
    plan: list[tuple[str, str]] = []
    skipped = set(skip)
    for name, info in ckpt.tensor_infos.items():
        ir = _ir_name(arch, name, ckpt.path)
        if ir is None or name in skipped:
            continue
        if info.ggml_type not in _FLOAT_TYPES and not _can_dequantize(GGMLQuantizationType[info.ggml_type]):
            raise MlxcError(
                f"{ckpt.path}: tensor {name} has type {info.ggml_type}, which mlxc cannot dequantize "
                f"(supported: F32, F16, BF16 and {', '.join(_dequantizable())})"
            )
        plan.append((name, ir))

    out: dict[str, mx.array] = {}
    for name, ir in plan:
        info = ckpt.tensor_infos[name]
        if info.ggml_type == "BF16":
            u16 = np.asarray(ckpt.raw(name)).view(np.uint16).reshape(info.shape)
            arr_np = u16
        elif info.ggml_type == "F16":
            arr_np = np.asarray(ckpt.raw(name)).view(np.float16).reshape(info.shape)
        else:
            arr_np = _to_numpy_float(ckpt, name)
        order = None if as_stored else row_order(ckpt, ir)
        if order is not None:
            arr_np = arr_np[order]
        if as_stored:
            ir = stored_name(ckpt, ir)
        if info.ggml_type == "BF16":
            arr = mx.array(np.ascontiguousarray(arr_np)).view(mx.bfloat16)
        else:
            arr = mx.array(np.ascontiguousarray(arr_np))
        if want is not None and arr.dtype != want:
            arr = arr.astype(want)
        out[ir] = arr
    if spec.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _can_dequantize(qtype) -> bool:
    from gguf.quants import _type_traits

    return qtype in _type_traits


def _dequantizable() -> list[str]:
    from gguf.quants import _type_traits

    return [q.name for q in sorted(_type_traits, key=int)]


# -------------------------------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other bytes to
    code points from 256 upward in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's split pattern (what `ByteLevel(use_regex=True)` applies).
_GPT2_SPLIT: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's (tiktoken cl100k-style) split.
_LLAMA3_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Qwen2's: like Llama 3's but one digit per piece.
_QWEN2_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> how text is split before byte-level BPE: ("gpt2", None) is GPT-2's regex alone,
# ("digits", None) isolates every digit first and then applies GPT-2's regex (llama.cpp's smollm/starcoder group,
# like those models' own tokenizer.json), ("split", regex) replaces the regex. Unknown values fall back to GPT-2's
# regex, as transformers' GGUF loader does.
_PRE_TOKENIZERS: Final[Mapping[str, tuple[str, Optional[str]]]] = {
    "default": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "gpt-2": ("gpt2", None),
    "smollm": ("digits", None),
    "starcoder": ("digits", None),
    "refact": ("digits", None),
    "llama3": ("split", _LLAMA3_SPLIT),
    "llama-v3": ("split", _LLAMA3_SPLIT),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "smaug-bpe": ("split", _LLAMA3_SPLIT),
    "dbrx": ("split", _LLAMA3_SPLIT),
    "falcon3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
    "deepseek-r1-qwen": ("split", _QWEN2_SPLIT),
}


def _byte_level_pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    mode, regex = _PRE_TOKENIZERS.get(pre or "default", ("gpt2", None))
    if mode == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if mode == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _byte_level_tokenizer(ckpt: GGUFCheckpoint, md: Mapping[str, Any]):
    from tokenizers import Tokenizer, decoders, models

    tokens: list[str] = md["tokenizer.ggml.tokens"]
    merges_raw = md.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise MlxcError(f"{ckpt.path}: byte-level (gpt2) vocabulary without tokenizer.ggml.merges")
    table = _byte_alphabet()
    alphabet = set(table.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # Tokens outside the byte alphabet (some files store added tokens in plain text) get respelled.
        key = tok if set(tok) <= alphabet else "".join(table[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise MlxcError(f"{ckpt.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, continuing_subword_prefix="",
                           end_of_word_suffix="")
    except Exception as e:
        raise MlxcError(f"{ckpt.path}: cannot build the BPE tokenizer ({e})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, tokens, md.get("tokenizer.ggml.token_type"), byte_alphabet=alphabet)
    return tok


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored sentencepiece vocabulary: every split of a token into two vocabulary
    pieces, best-scored merged token first (then by the pieces' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for t, i in ids.items():
        if len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_tokenizer(ckpt: GGUFCheckpoint, md: Mapping[str, Any]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = md["tokenizer.ggml.tokens"]
    scores = md.get("tokenizer.ggml.scores")
    types = md.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if not scores or len(scores) != len(tokens):
        raise MlxcError(f"{ckpt.path}: sentencepiece vocabulary without tokenizer.ggml.scores for every token")
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = md.get("tokenizer.ggml.merges")
    merge_pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges
                   else _sentencepiece_merges(tokens, [float(s) for s in scores]))
    byte_fallback = any(t == _TOKEN_BYTE for t in types)
    model = models.BPE(vocab=vocab, merges=merge_pairs, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    tok = Tokenizer(model)
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _add_special_tokens(tok, tokens, types, byte_alphabet=None)
    return tok


def _add_special_tokens(tok, tokens: list[str], types: Optional[list[int]], byte_alphabet: Optional[set[str]]):
    """Control tokens become special added tokens (matched whole, skippable on decode); user-defined ones plain
    added tokens. In a byte-level vocabulary a control token spelled outside the byte alphabet is a converter
    mislabel and is left alone."""
    from tokenizers import AddedToken

    if not types:
        return
    control = [t for t, ty in zip(tokens, types)
               if ty == _TOKEN_CONTROL and (byte_alphabet is None or set(t) <= byte_alphabet)]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


_TOKENIZER_BUILDERS: Final[Mapping[str, Callable[[GGUFCheckpoint, Mapping[str, Any]], Any]]] = {
    "gpt2": _byte_level_tokenizer,
    "llama": _sentencepiece_tokenizer,
}


@dataclass(frozen=True)
class TokenizerParts:
    """A tokenizer as a checkpoint describes it: the `tokenizers` object plus the special tokens, chat template and
    BOS/EOS policy. The runtime wraps it (`runtime.tokenizer.Tokenizer.from_parts`); frontends stop at data."""

    tokenizer: Any
    bos_token: Optional[str] = None
    eos_token: Optional[list[str]] = None
    chat_template: Optional[str] = None
    special_tokens: Mapping[str, Optional[str]] = field(default_factory=dict)
    add_bos_token: bool = False
    add_eos_token: bool = False


def gguf_tokenizer(ckpt: GGUFCheckpoint) -> TokenizerParts:
    """The tokenizer the file's `tokenizer.*` metadata describes (vocabulary, merges, special tokens, chat
    template)."""
    md = ckpt.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind is None or not md.get("tokenizer.ggml.tokens"):
        raise MlxcError(f"{ckpt.path}: the file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    builder = _TOKENIZER_BUILDERS.get(kind)
    if builder is None:
        raise MlxcError(
            f"{ckpt.path}: unsupported GGUF tokenizer {kind!r} (tokenizer.ggml.model); "
            f"supported: {', '.join(sorted(_TOKENIZER_BUILDERS))}"
        )
    tok = builder(ckpt, md)
    tokens = md["tokenizer.ggml.tokens"]

    def token(key: str) -> Optional[str]:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = [t for t in (token("eos_token_id"), token("eot_token_id")) if t is not None]
    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama"  # llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise
    template = md.get("tokenizer.chat_template")
    return TokenizerParts(
        tok,
        bos_token=token("bos_token_id"),
        eos_token=list(dict.fromkeys(eos)) or None,
        chat_template=template if isinstance(template, str) else None,
        special_tokens={"unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")},
        add_bos_token=bool(add_bos),
        add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
    )
