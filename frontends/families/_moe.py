"""What the mixture-of-experts families share (not a family: files starting with `_` are not scanned).

Their configs name the router settings alike (`num_experts_per_tok`, `norm_topk_prob`, ...), Qwen-style models mix
dense layers in (`decoder_sparse_step`, `mlp_only_layers`), and every one of their checkpoints stores one tensor per
expert (transformers 5 holds them fused in memory but saves them apart), which the lowered program reads stacked.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from ...ir.layout import LayoutRule, StackParams
from ..spec import FFNType, ModelSpec, MoESpec
from ..spec_file import validation_message

# The IR's expert weights, stacked [E, ...] in the body, one checkpoint tensor per expert
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")

# Qwen-MoE / OLMoE checkpoint names of the router and the experts (`{e}`: the expert index)
EXPERT_NAMES: tuple[tuple[str, str], ...] = (
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    ("model.layers.{i}.mlp.experts.{e}.{mlp}_proj.weight", "layers.{i}.mlp.experts.{e}.{mlp}_proj.weight"),
)
FIELDS = {"e": r"\d+"}


def layout(spec: ModelSpec) -> tuple[LayoutRule, ...]:
    """Each expert weight [E, out, in] is stacked at load from the checkpoint's E tensors."""
    if spec.moe is None:
        return ()
    return tuple(StackParams(f"experts.{w}.weight", f"experts.{{}}.{w}.weight") for w in EXPERT_WEIGHTS)


def _count(c, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise c.error(f"`{key}` must be a positive integer, got {value!r}")
    return value


def num_experts(c, *keys: str) -> int:
    """The expert count under the first of `keys` the config has (transformers 5 saves Qwen3-MoE's `num_experts` as
    `num_local_experts` and OLMoE's the other way round)."""
    given = {k: c.data[k] for k in keys if k in c}
    if len(set(map(repr, given.values()))) > 1:
        both = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise c.error(f"the expert count is given twice and differs: {both}")
    key = next(iter(given), keys[0])
    value = c.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    return _count(c, key, value)


def moe_settings(c, experts: int, experts_key: str, size_key: str, *, normalize: bool,
                 weights_in_float32: bool = False, shared_key: Optional[str] = None) -> MoESpec:
    """The MoESpec of a config, with errors that name its keys."""
    top_k = _count(c, "num_experts_per_tok", c.get("num_experts_per_tok"))
    size = _count(c, size_key, c.get(size_key))
    if top_k > experts:
        raise c.error(f"num_experts_per_tok ({top_k}) exceeds {experts_key} ({experts})")
    if not isinstance(normalize, bool):
        raise c.error(f"`norm_topk_prob` must be true or false, got {normalize!r}")
    shared = _count(c, shared_key, c.get(shared_key)) if shared_key else None
    try:
        return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=size, normalize=normalize,
                       weights_in_float32=weights_in_float32, shared_expert_intermediate_size=shared,
                       shared_expert_gate=shared is not None)
    except ValidationError as err:
        keys = {"num_experts": experts_key, "top_k": "num_experts_per_tok", "intermediate_size": size_key,
                "shared_expert_intermediate_size": shared_key or "shared_expert_intermediate_size"}
        raise c.error(validation_message(err, "mixture of experts", keys)) from None


def sparse_layers(c, count: int, experts: int) -> list[bool]:
    """Which layers are mixtures (Qwen-MoE): not in `mlp_only_layers`, and every `decoder_sparse_step`-th."""
    step = _count(c, "decoder_sparse_step", c.get("decoder_sparse_step"))
    dense = c.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise c.error(f"`mlp_only_layers` must be a list of layer indices, got {dense!r}")
    outside = [i for i in dense if not 0 <= i < count]
    if outside:
        raise c.error(f"`mlp_only_layers` names layer {outside[0]}, but the model has {count} layers")
    return [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(count)]


def moe_fields(spec: ModelSpec) -> dict[str, Any]:
    """The router keys of a config.json, from a spec (the inverse of `moe_settings`)."""
    m = spec.moe
    if m is None:
        return {"num_experts_per_tok": 1}
    return {"num_experts_per_tok": m.top_k, "norm_topk_prob": m.normalize}


def dense_layers(spec: ModelSpec) -> list[int]:
    """`mlp_only_layers`: the layers whose FFN is not the mixture."""
    return [i for i in range(spec.num_layers) if spec.layer(i).ffn.kind != FFNType.MOE]
