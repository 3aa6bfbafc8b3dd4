"""Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and written.

Reading gives a `LoRAConfig` for the `lora` pass and the adapter tensors under IR names; writing produces a folder
that `peft.PeftModel.from_pretrained` loads back.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx

from ..files import carry_over, check_safetensors, replacing_dir
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
        cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MlxcError(f"{d / CONFIG_FILE}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise MlxcError(f"{d / CONFIG_FILE}: malformed JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise MlxcError(f"{d / CONFIG_FILE}: expected a JSON object, got {type(cfg).__name__}")
    rank, alpha, dropout, rslora = _settings(cfg, d / CONFIG_FILE)
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
    check_safetensors(weights)
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
        # lora_A is [r, in], lora_B [out, r]: the rank the config declares is what the tensors must hold
        if arr.ndim != 2 or arr.shape[0 if m.group(2) == "lora_A" else 1] != rank:
            raise MlxcError(f"{weights}: adapter tensor {name} has shape {list(arr.shape)}, which does not hold "
                            f"rank r={rank} from {CONFIG_FILE}")
        if not mx.issubdtype(arr.dtype, mx.floating):
            raise MlxcError(f"{weights}: adapter tensor {name} has dtype {arr.dtype}; LoRA weights are floats")
        tensors[f"{ir_module[: -len('.weight')]}.{m.group(2)}.weight"] = arr
    if not tensors:
        raise MlxcError(f"{weights} holds no LoRA tensors")
    leaves = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors})
    return PeftAdapter(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(leaves), rslora=rslora,
                       tensors=tensors)


def _settings(cfg: dict, where: Path) -> tuple[int, float, float, bool]:
    """r, lora_alpha, lora_dropout and use_rslora, each of the kind peft writes (a rank is a positive integer, the
    others finite numbers and a boolean), so a damaged config fails here, naming the key."""
    def number(key: str, default: float) -> float:
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MlxcError(f"{where}: malformed LoRA settings: {key} must be a finite number, got {v!r}")
        return float(v)

    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise MlxcError(f"{where}: malformed LoRA settings: r must be a positive integer, got {r!r}")
    dropout = number("lora_dropout", 0.0)
    if not 0 <= dropout < 1:
        raise MlxcError(f"{where}: malformed LoRA settings: lora_dropout must be in [0, 1), got {dropout}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise MlxcError(f"{where}: malformed LoRA settings: use_rslora must be true or false, got {rslora!r}")
    return r, number("lora_alpha", 8), dropout, rslora


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
    # built beside the destination and swapped in whole (an existing folder's other files carried over as hard
    # links), so an interruption at any point leaves the old adapter or the new one, never a mix of the two
    with replacing_dir(d) as tmp:
        if d.is_dir():
            carry_over(d, tmp, skip=(WEIGHTS_FILE, CONFIG_FILE))
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), out, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return d
