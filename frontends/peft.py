"""Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and written.

Reading gives a `LoRAConfig` for the `lora` pass and the adapter tensors under IR names; writing produces a folder
that `peft.PeftModel.from_pretrained` loads back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx

from ..files import make_sibling_dir
from ..ir.errors import MlxcError
from . import hf

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_ADAPTER = re.compile(r"(.+)\.(lora_[AB])(?:\.default)?\.weight")


@dataclass(frozen=True)
class PeftAdapter:
    """What a PEFT LoRA folder holds: the settings the `lora` pass needs and the A/B matrices under IR names
    (`layers.0.attn.q_proj.lora_A.weight`)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    rslora: bool
    tensors: dict[str, mx.array]


def read_peft_adapter(path: str | Path, family: str | None = None) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder for a base model of `family` (its checkpoint names)."""
    d = Path(path)
    if not (d / CONFIG_FILE).is_file():
        raise MlxcError(f"{d} is not a PEFT adapter folder: no {CONFIG_FILE}")
    try:
        cfg = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise MlxcError(f"{d / CONFIG_FILE}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MlxcError(f"{d}: only LoRA adapters are supported, this one is {cfg.get('peft_type')}")
    for key, ok in (("bias", ("none", None)), ("modules_to_save", (None, [])), ("layers_to_transform", (None, [])),
                    ("use_dora", (False, None)), ("fan_in_fan_out", (False, None))):
        if cfg.get(key) not in ok:
            raise MlxcError(f"{d}: adapter option {key}={cfg.get(key)!r} is not supported yet")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise MlxcError(f"{d}: per-module rank_pattern/alpha_pattern is not supported yet")
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise MlxcError(f"{d}: no {WEIGHTS_FILE} (pickled adapter_model.bin files are not read)")
    try:
        raw = mx.load(str(weights))
    except Exception as e:
        raise MlxcError(f"cannot read {weights}: {e}") from None

    tensors: dict[str, mx.array] = {}
    for name, arr in raw.items():
        m = _ADAPTER.fullmatch(name.removeprefix(_PEFT_PREFIX))
        ir_module = hf.hf_to_ir_name(m.group(1) + ".weight", family) if m else None
        if not m or ir_module in (None, hf.UNMAPPED):
            raise MlxcError(f"{weights}: unexpected adapter tensor {name}")
        tensors[f"{ir_module[: -len('.weight')]}.{m.group(2)}.weight"] = arr
    if not tensors:
        raise MlxcError(f"{weights} holds no LoRA tensors")
    leaves = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors})
    try:
        return PeftAdapter(rank=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                           dropout=float(cfg.get("lora_dropout", 0.0)), targets=tuple(leaves),
                           rslora=bool(cfg.get("use_rslora", False)), tensors=tensors)
    except (TypeError, ValueError) as e:
        raise MlxcError(f"{d / CONFIG_FILE}: malformed LoRA settings ({e})") from None


def save_peft_adapter(path: str | Path, config, tensors: Mapping[str, mx.array], base_model: str = "",
                      family: str | None = None) -> Path:
    """Write IR-named adapter tensors as a PEFT folder (names, layout and config as peft expects). `config` has the
    adapters' rank, alpha, dropout and rslora (the `lora` pass's LoRAConfig)."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise MlxcError(f"{d} exists and is not a directory")
    out = {}
    for name, arr in tensors.items():
        module, _, rest = name.partition(".lora_")
        hf_module = hf.ir_to_hf_name(module + ".weight", family)[: -len(".weight")]
        out[f"{_PEFT_PREFIX}{hf_module}.lora_{rest}"] = arr
    # peft finds modules by the checkpoint's names (Phi's `dense`, not the IR's `o_proj`)
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in out})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": config.rank,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets, "bias": "none",
        "use_rslora": config.rslora, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True,
    }
    # written beside the destination and swapped in, so a failure never leaves half an adapter
    tmp = make_sibling_dir(d)
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), out, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if d.exists():  # an existing folder keeps its other files; the adapter's two are replaced
            for f in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(tmp / f, d / f)
        else:
            os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d
