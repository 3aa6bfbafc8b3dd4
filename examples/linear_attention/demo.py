"""The worked example: compile the hybrid in hybrid.yaml (the plugin's linear attention interleaved with softmax
attention), train LoRA adapters for a few steps on a repeating pattern, and generate.

    pip install ./examples/linear_attention        # once: the plugin, found through its entry point
    python examples/linear_attention/demo.py [--steps 30] [--artifact OUT]

Without installing it works too: the demo then imports the plugin from beside itself (`mlxc.plugins.load_module`).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

import mlxc
from mlxc.plugins import load_module, load_plugins

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--artifact", help="also compile the (untrained) hybrid to this artifact directory")
    args = parser.parse_args()

    if not any(p.name == "linear-attention" and p.loaded for p in load_plugins()):
        sys.path.insert(0, str(HERE))  # not pip-installed: register it by hand, from here
        load_module("mlxc_linear_attention")

    from mlxc.runtime.train import TrainConfig, train_lora

    spec = HERE / "hybrid.yaml"
    model = mlxc.load(str(spec), lora=mlxc.LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
                      seed=1, init_scale=0.3)
    print(f"states: {[kind for kind, _ in model.module.STATES]}")
    pattern = [5, 9, 17, 33, 65, 12, 40, 7] * 8
    result = train_lora(model.net, [pattern] * 8, TrainConfig(steps=args.steps, batch_size=4, seq_len=48,
                                                             learning_rate=2e-2, log_every=10))
    print(f"LoRA loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {result.steps} steps "
          f"({result.num_adapter_params} adapter parameters)")
    out = model.generate(mx.array([pattern[:8]]), max_new_tokens=16, stop_tokens=[])
    print(f"prompt {pattern[:8]} -> {out[0, 8:].tolist()}")
    if args.artifact:
        path = mlxc.compile(str(spec), args.artifact, seed=1, init_scale=0.3, overwrite=True)
        print(f"artifact {path}; its manifest records the plugin it needs")


if __name__ == "__main__":
    main()
