"""Mamba (state-spaces/mamba-*-hf, transformers' MambaForCausalLM): attention-free, every layer an RMSNorm before a
Mamba mixer (frontends/blocks/mamba.py) and no FFN; a final RMSNorm (`norm_f`) and an LM head tied to the
embeddings by default.

transformers keeps the residual stream in float32 (`residual_in_fp32`, on by default): each block casts it to the
compute dtype for its norm and adds the mixer's output back in float32, and `norm_f` normalizes it in float32.
mlxc lowers the same casts (`ModelSpec.residual_in_fp32`); in a float32 model they vanish.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..spec import Activation, BlockKind, FFNType, LayerSpec, MambaSpec, ModelSpec, PositionEmbedding
from ..spec_file import validation_message
from .base import HEAD_NAMES, Family, NameTable

# transformers' MambaConfig defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50280,
    "hidden_size": 768,
    "state_size": 16,
    "num_hidden_layers": 32,
    "layer_norm_epsilon": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "expand": 2,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "time_step_rank": "auto",
    "tie_word_embeddings": True,
}

# the mixer's tensors, under the same names in the checkpoint and the IR
MIXER = r"in_proj\.(?:weight|bias)|conv1d\.(?:weight|bias)|x_proj\.weight|dt_proj\.(?:weight|bias)|A_log|D|" \
        r"out_proj\.(?:weight|bias)"

NAMES = NameTable(
    (
        ("backbone.embeddings.weight", "embed_tokens.weight"),
        ("backbone.embedding.weight", "embed_tokens.weight"),  # older checkpoints (transformers renames on load)
        ("backbone.layers.{i}.norm.weight", "layers.{i}.input_norm.weight"),
        ("backbone.layers.{i}.mixer.{part}", "layers.{i}.mixer.{part}"),
        ("backbone.norm_f.weight", "norm.weight"),
    ) + HEAD_NAMES,
    fields={"part": MIXER},
)

_KEYS = {"state_size": "state_size", "conv_kernel": "conv_kernel", "expand": "expand",
         "time_step_rank": "time_step_rank"}


def mixer_settings(c, keys: dict[str, str], bcdt_norm: bool = False, **fields: Any) -> MambaSpec:
    """The MambaSpec from a config's keys (`keys`: spec field -> config key), `time_step_rank` "auto" resolved as
    transformers does; errors name the config's keys."""
    rank = c.get(keys["time_step_rank"])
    if rank == "auto":
        rank = -(-c.get("hidden_size") // 16) if isinstance(c.get("hidden_size"), int) else None
    values = {k: c.get(key) for k, key in keys.items() if k != "time_step_rank"}
    try:
        return MambaSpec(**values, time_step_rank=rank, activation=c.activation(), bcdt_norm=bcdt_norm, **fields)
    except ValidationError as err:
        raise c.error(validation_message(err, "mamba", keys)) from None


def config(c) -> dict[str, Any]:
    mixer = mixer_settings(c, _KEYS, use_bias=c.get("use_bias"), use_conv_bias=c.get("use_conv_bias"))
    hidden, layers = c.get("hidden_size"), c.get("num_hidden_layers")
    count = layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else 0
    return dict(
        vocab_size=c.get("vocab_size"),
        hidden_size=hidden,
        # transformers derives the inner width from expand (a config's `intermediate_size` is overwritten)
        intermediate_size=mixer.expand * hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else hidden,
        num_layers=layers,
        layers=tuple(LayerSpec(block=BlockKind.MAMBA) for _ in range(count)),
        mamba=mixer,
        ffn=FFNType.NONE,
        position=PositionEmbedding.NONE,
        norm_eps=c.get("layer_norm_epsilon"),
        residual_in_fp32=bool(c.get("residual_in_fp32")),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=c.eos_ids(),
        pad_token_id=c.get("pad_token_id"),
        head=c.head(),
    )


def mixer_fields(spec: ModelSpec, prefix: str = "") -> dict[str, Any]:
    """The mixer's config keys (`prefix` + name: Jamba writes `mamba_d_state`, ...) from its MambaSpec."""
    from ..hf import HF_ACTIVATION

    m = spec.mamba or MambaSpec()
    return {"state_size": m.state_size, "conv_kernel": m.conv_kernel, "expand": m.expand,
            "time_step_rank": m.rank(spec.hidden_size), "use_bias": m.use_bias, "use_conv_bias": m.use_conv_bias,
            "hidden_act": HF_ACTIVATION[m.activation]}


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """MambaForCausalLM's config.json for a spec; what it cannot hold (attention layers, FFNs, ...) is found by
    `hf_config_from_spec` comparing the programs."""
    eos = list(spec.eos_token_ids)
    m = spec.mamba or MambaSpec()
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": m.expand * spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        **mixer_fields(spec),
        "layer_norm_epsilon": spec.norm_eps,
        "residual_in_fp32": spec.residual_in_fp32,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": spec.pad_token_id,
    }


def preset(name: str, hidden: int, layers: int) -> ModelSpec:
    """state-spaces/mamba-*-hf: GPT-NeoX's tokenizer (50277 ids, padded to 50280), <|endoftext|> (0) as bos, eos
    and pad, state 16, conv 4, expand 2, rank ceil(hidden / 16), tied embeddings."""
    return ModelSpec(name=name, family="mamba", vocab_size=50280, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_layers=layers, layers=tuple(LayerSpec(block=BlockKind.MAMBA) for _ in range(layers)),
                     mamba=MambaSpec(time_step_rank=-(-hidden // 16), activation=Activation.SILU),
                     ffn=FFNType.NONE, position=PositionEmbedding.NONE, norm_eps=1e-5, residual_in_fp32=True,
                     tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,), pad_token_id=0)


PRESETS = (
    preset("mamba-130m", 768, 24),
    preset("mamba-370m", 1024, 48),
    preset("mamba-790m", 1536, 48),
    preset("mamba-1.4b", 2048, 48),
    preset("mamba-2.8b", 2560, 64),
)

FAMILIES = (
    Family(
        "mamba",
        architectures=("Mamba",),
        config=config,
        model_types=("mamba",),
        defaults=DEFAULTS,
        names=NAMES,
        tensor_markers=(
            r"backbone\.layers\.\d+\.mixer\.x_proj\.weight",
            r"backbone\.layers\.\d+\.mixer\.dt_proj\.weight",
            r"backbone\.layers\.\d+\.mixer\.A_log",
        ),
        presets=PRESETS,
        hub_ids=((r"state-spaces/mamba-(130m|370m|790m|1\.4b|2\.8b)(-hf)?", r"mamba-\1"),),
        to_hf_config=to_hf_config,
    ),
)
