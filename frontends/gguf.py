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

import math
import mmap
import os
import re
import struct
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
from .spec_file import check_finite, validation_message

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
    _data: Any = field(repr=False, compare=False)  # the file's mapping (_GGUFData)

    @property
    def arch(self) -> GGUFArch:
        return architectures()[self.architecture]

    def ir_name(self, gguf_name: str) -> Optional[str]:
        """The IR parameter name of a GGUF tensor, None if deliberately dropped; MlxcError if unknown."""
        return _ir_name(self.arch, gguf_name, self.path)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data, mapped from the file (quantized types: uint8 blocks, numpy-ordered rows)."""
        info = self.tensor_infos.get(name)
        if info is None:
            raise MlxcError(f"{self.path}: no tensor named {name!r}")
        return self._data.array(info)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor by GGUF name as float32 numpy, in the file's own layout (no Q/K un-permutation)."""
        return _to_numpy_float(self, name)


# GGUF metadata value types (gguf's GGUFValueType): struct codes of the scalars, then string and array.
_SCALAR_FORMATS: Final = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS
_MAX_ARRAY: Final = 1 << 24  # elements of one metadata array; real vocabularies have a few hundred thousand
_MIN_KV_BYTES: Final = 13  # key length (8) + value type (4) + the smallest value (1)
_MIN_TENSOR_BYTES: Final = 24  # name length (8) + dimension count (4) + type (4) + offset (8)


class _Header:
    """A cursor over the file's bytes that refuses to read past the end: every length, count and offset the file
    declares is checked against the bytes that really follow before anything is built from it (as llama.cpp's
    `gguf_init_from_file` checks them), so a corrupt or hostile header is an MlxcError, never a huge allocation
    or a loop over counts the file cannot hold."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def corrupt(self, message: str) -> MlxcError:
        return MlxcError(f"{self.path} is truncated or corrupt: {message} (the file is {self.size} bytes)")

    def need(self, n: int, what: str) -> int:
        """Claim `n` bytes for `what`; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.corrupt(f"{what} at byte {start} needs {n} bytes, but only {self.size - start} remain")
        self.pos = start + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.need(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str, strict: bool = True) -> str:
        n = self.unpack("Q", f"the length of {what}")
        start = self.need(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} at byte {start} is not UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        """A metadata value as Python: str, int, float, bool or a list of them. FLOAT32 gets its shortest repr."""
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            value = self.unpack(fmt, f"the value of `{key}`")
            return float(str(np.float32(value))) if vtype == _FLOAT32 else value  # 9.999999747e-06 -> 1e-05
        if vtype == _STRING:
            return self.string(f"the value of `{key}`", strict=False)
        if vtype != _ARRAY:
            raise self.corrupt(f"metadata key `{key}` has unknown value type {vtype}")
        itype = self.unpack("I", f"the element type of `{key}`")
        count = self.unpack("Q", f"the length of `{key}`")
        if itype == _ARRAY:
            raise self.corrupt(f"metadata key `{key}` is an array of arrays, which GGUF readers do not support")
        if count > _MAX_ARRAY:
            raise self.corrupt(f"metadata array `{key}` declares {count} elements (at most {_MAX_ARRAY} are read)")
        fmt = _SCALAR_FORMATS.get(itype)
        if fmt is not None:
            dtype = np.dtype("<" + fmt if fmt != "?" else "?")
            start = self.need(count * dtype.itemsize, f"the {count} elements of `{key}`")
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if itype != _STRING:
            raise self.corrupt(f"metadata array `{key}` has unknown element type {itype}")
        if count * 8 > self.size - self.pos:
            raise self.corrupt(f"metadata array `{key}` declares {count} strings, more than the "
                               f"{self.size - self.pos} remaining bytes can hold")
        out, buf, size, unpack, pos = [], self.buf, self.size, struct.unpack_from, self.pos
        for i in range(count):
            n = unpack("<Q", buf, pos)[0] if pos + 8 <= size else None
            if n is None or n > size - pos - 8:
                raise self.corrupt(f"string {i} of `{key}` at byte {pos} runs past the end of the file")
            out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"))
            pos += 8 + n
        self.pos = pos
        return out


_PLAIN_TYPES: Final = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
                       "F64": np.dtype("<f8"), "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
                       "I64": np.dtype("<i8")}


@dataclass(frozen=True)
class _GGUFData:
    """The file's mapping: `array(info)` views one tensor's bytes, read from the file only when used."""

    buf: Any

    def array(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored data in numpy order: float and integer types as such, block-quantized types as uint8 rows."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        dtype, shape = _PLAIN_TYPES.get(info.ggml_type), info.shape
        if dtype is None:
            dtype, shape = np.dtype(np.uint8), quant_shape_to_byte_shape(shape, GGMLQuantizationType[info.ggml_type])
        return np.frombuffer(self.buf, dtype, info.n_bytes // dtype.itemsize, info.offset).reshape(shape)


def _open_reader(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo], _GGUFData]:
    """Parse the header (metadata and tensor table), every declared size checked against the file's."""
    if not path.exists():
        raise MlxcError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise MlxcError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if len(head) == 8 else None
    except (OSError, ValueError) as e:
        raise MlxcError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if head[:4] != GGUF_MAGIC:
        raise MlxcError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 8:
        raise MlxcError(f"{path} is truncated: it ends inside the GGUF header")
    h = _Header(buf, size, path)
    h.need(4, "the magic")
    version = h.unpack("I", "the version")
    if version and version & 0xFFFF == 0:
        raise MlxcError(f"{path} is a big-endian GGUF file; mlxc reads little-endian ones (llama.cpp's "
                        "gguf-convert-endian converts it)")
    if version not in (2, 3):
        raise MlxcError(f"{path} has GGUF version {version}; mlxc reads versions 2 and 3")
    n_tensors = h.unpack("Q", "the tensor count")
    n_kv = h.unpack("Q", "the metadata count")
    if n_kv * _MIN_KV_BYTES > size - h.pos:
        raise h.corrupt(f"the header declares {n_kv} metadata entries, more than the rest of the file can hold")
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key {i}")
        if key in metadata:
            raise h.corrupt(f"metadata key `{key}` appears twice")
        vtype = h.unpack("I", f"the value type of `{key}`")
        metadata[key], types[key] = h.value(vtype, key), vtype
    if n_tensors * _MIN_TENSOR_BYTES > size - h.pos:
        raise h.corrupt(f"the header declares {n_tensors} tensors, more than the rest of the file can hold")
    table = []
    for i in range(n_tensors):
        name = h.string(f"the name of tensor {i}")
        n_dims = h.unpack("I", f"the dimension count of tensor {name}")
        if n_dims > _MAX_DIMS:
            raise h.corrupt(f"tensor {name} declares {n_dims} dimensions (GGUF allows at most {_MAX_DIMS})")
        ne = [h.unpack("Q", f"dimension {j} of tensor {name}") for j in range(n_dims)]
        table.append((name, ne, h.unpack("I", f"the type of tensor {name}"),
                      h.unpack("Q", f"the data offset of tensor {name}")))
    alignment = metadata.get("general.alignment", 32)
    if "general.alignment" in metadata and (types["general.alignment"] != 4 or not alignment
                                            or alignment & (alignment - 1)):
        raise h.corrupt(f"general.alignment is {alignment!r}; it must be a power of two stored as UINT32")
    data_offset = -(-h.pos // alignment) * alignment
    infos: dict[str, GGUFTensorInfo] = {}
    for name, ne, raw_type, offset in table:
        if name in infos:
            raise h.corrupt(f"tensor {name} appears twice in the tensor table")
        infos[name] = _tensor_info(h, name, ne, raw_type, offset, data_offset, alignment)
    end = data_offset
    for info in sorted(infos.values(), key=lambda t: t.offset):
        if info.offset < end:
            raise h.corrupt(f"the data of tensor {info.name} (bytes {info.offset}-{info.offset + info.n_bytes}) "
                            "overlaps another tensor's")
        end = info.offset + info.n_bytes
    return metadata, infos, _GGUFData(buf)


def _tensor_info(h: _Header, name: str, ne: list[int], raw_type: int, offset: int, data_offset: int,
                 alignment: int) -> GGUFTensorInfo:
    """One tensor-table entry checked as llama.cpp checks it: a known type, rows of whole blocks, an aligned offset,
    and data inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise h.corrupt(f"tensor {name} has unknown type {raw_type}") from None
    if any(d >= 1 << 63 for d in ne):
        raise h.corrupt(f"tensor {name} has a negative dimension")
    if ne and ne[0] % block:
        raise h.corrupt(f"tensor {name} ({qtype.name}) has rows of {ne[0]} values, not a whole number of "
                        f"{block}-value blocks")
    n_bytes = math.prod(ne) // block * type_size
    if offset % alignment:
        raise h.corrupt(f"tensor {name}'s data offset {offset} is not a multiple of the alignment {alignment}")
    start = data_offset + offset
    if start + n_bytes > h.size:
        raise MlxcError(f"{h.path} is truncated: tensor {name} needs bytes {start}-{start + n_bytes} but the file "
                        f"has {h.size}")
    return GGUFTensorInfo(name=name, ggml_type=qtype.name, shape=tuple(reversed(ne)), n_bytes=n_bytes, offset=start)


def read_gguf(path: PathLike, name: Optional[str] = None) -> GGUFCheckpoint:
    """Parse a GGUF file's header: metadata, tensor table and the ModelSpec. Tensor data is not read.

    `name` names the spec; it defaults to the file name without `.gguf`.
    """
    p = Path(path).expanduser()
    metadata, infos, data = _open_reader(p)
    architecture = metadata.get("general.architecture")
    known = architectures()
    if architecture not in known:
        raise MlxcError(
            f"{p}: unsupported GGUF architecture {architecture!r} (general.architecture); supported: {_supported()}"
        )
    _check_metadata_types(architecture, metadata, p)
    try:
        spec = _spec(known[architecture], metadata, infos, name or p.name.removesuffix(".gguf"), p)
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:  # a value of a shape no
        raise MlxcError(f"{p}: malformed metadata ({type(e).__name__}: {e})") from None  # check above foresaw
    check_finite(spec, str(p))
    return GGUFCheckpoint(p, spec, architecture, metadata, infos, data)


# Metadata the spec is built from, by the kind of value it must hold (keys after the architecture's prefix).
_INT_KEYS: Final = ("embedding_length", "feed_forward_length", "block_count", "context_length", "vocab_size",
                    "attention.head_count", "attention.head_count_kv", "attention.key_length",
                    "attention.value_length", "rope.dimension_count", "attention.sliding_window",
                    "rope.scaling.original_context_length")
_NUMBER_KEYS: Final = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                       "rope.freq_base_swa", "rope.scaling.factor", "rope.scaling.attn_factor",
                       "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "attn_logit_softcapping",
                       "final_logit_softcapping")
_TOKEN_ID_KEYS: Final = ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id", "unknown_token_id")


def _check_metadata_types(arch: str, md: Mapping[str, Any], path: Path) -> None:
    """Values the spec reads must be of the kind their key means (a count an integer, a token id a non-negative
    integer), so a damaged file fails naming the key rather than deep inside the arithmetic."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def bad(key: str, value: Any, what: str) -> MlxcError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return MlxcError(f"{path}: metadata key `{key}` should be {what}, got {shown}")

    for k in _INT_KEYS:
        key = f"{arch}.{k}"
        v = md.get(key)
        if v is not None and not is_int(v) and not (isinstance(v, list) and v and all(map(is_int, v))):
            raise bad(key, v, "an integer")
    for k in _NUMBER_KEYS:
        key = f"{arch}.{k}"
        v = md.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, v, "a number")
    for k in _TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{k}"
        v = md.get(key)
        if v is not None and not (is_int(v) and v >= 0):
            raise bad(key, v, "a token id (an integer >= 0)")
    for key, kind in (("tokenizer.ggml.tokens", str), ("tokenizer.ggml.merges", str)):
        v = md.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, kind) for x in v)):
            raise bad(key, v, "a list of strings")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = md.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)):
            raise bad(key, v, "a list of numbers")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        v = md.get(key)
        if v is not None and not isinstance(v, str):
            raise bad(key, v, "a string")


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
