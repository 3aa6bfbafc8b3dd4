"""A shared harness for family tests: build a random-weight transformers checkpoint, then hold mlxc to it.

Family test files call these (each builds its checkpoints in a module-scoped fixture with `save_checkpoint`):

    check_logits(hf, model)          max |logits - HF| <= 1e-4 (fp32) over a batch of 2 x SEQ tokens
    check_greedy(hf, model)          16 greedy tokens through mlxc's cache == HF generate
    check_stepwise(model)            a prefill in chunks then one token at a time == one full prefill
    check_fusion(path)               the default (fused) pipeline == unfused `dce` only, logits and greedy tokens
    check_quantize(path)             --quantize 4 and 8 compile, run and stay close to float
    check_lora(path, targets)        a fresh adapter (B = 0) changes nothing; merged == unmerged with a trained B
    check_artifact(path, tmp_path)   mlxc.compile -> mlxc.load gives the same logits

Import it from a test file with `from parity import ...` (tests/ is on sys.path under pytest's importlib mode via
`conftest.py`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxc

SEQ = 20  # > the windows the family tests use, so sliding layers are exercised past their window
TOL = 1e-4


def randomize(model, seed: int, scale: float = 0.08) -> None:
    """Non-trivial norm weights and biases, so a wrong (1 + w) or a dropped bias cannot hide."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def save_checkpoint(cls, config, path: Path, seed: int = 0, scale: float = 0.08):
    """A transformers model of `cls` with random weights, saved to `path`; returns the (eval-mode) model."""
    import torch

    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed, scale)
    model.save_pretrained(path, safe_serialization=True)
    return model


def ids(vocab: int, shape=(2, SEQ), seed: int = 1, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, vocab, size=shape)


def hf_logits(hf, tokens: np.ndarray, **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.float().numpy()


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def check_logits(hf, model, vocab: int, seq: int = SEQ, tol: float = TOL) -> float:
    tokens = ids(vocab, (2, seq))
    err = max_diff(np.array(model(mx.array(tokens)).logits), hf_logits(hf, tokens))
    assert err <= tol, f"max |logits diff| = {err:.2e}"
    return err


def greedy_ids(model, ids, n: int) -> list[int]:
    """n greedy tokens after `ids` (a list of ints), one model call per token through mlxc's cache."""
    cache, out = model.make_cache(), []
    step = model(mx.array([ids]), cache=cache).logits[0, -1]
    for _ in range(n):
        out.append(int(mx.argmax(step)))
        step = model(mx.array([[out[-1]]]), cache=cache).logits[0, -1]
    return out


def check_greedy(hf, model, vocab: int, prompt_len: int = 9, new: int = 16) -> None:
    import torch

    prompt = ids(vocab, (1, prompt_len), seed=2)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0).numpy()
    ours = np.array(model.generate(mx.array(prompt), max_new_tokens=new, temperature=0.0, stop_tokens=()))
    assert ours.tolist() == ref.tolist(), "greedy tokens through the cache differ from transformers' generate"


def check_stepwise(model, vocab: int, seq: int = SEQ, chunks=(5, 4)) -> None:
    """Chunks of the prompt, then one token at a time, through the cache: the logits of one full prefill."""
    tokens = mx.array(ids(vocab, (2, seq), seed=3))
    full = np.array(model(tokens).logits)
    cache = model.make_cache()
    parts, at = [], 0
    for n in chunks:
        parts.append(model(tokens[:, at : at + n], cache=cache).logits)
        at += n
    for t in range(at, seq):
        parts.append(model(tokens[:, t : t + 1], cache=cache).logits)
    err = max_diff(np.array(mx.concatenate(parts, axis=1)), full)
    assert err <= TOL, f"stepwise vs full prefill: {err:.2e}"


def check_fusion(path, vocab: int, fused_names=("qkv_proj",)) -> None:
    fused = mlxc.load(str(path), kernels="reference")  # the rewrites alone: `dce` below chooses no kernels either
    unfused = mlxc.load(str(path), passes=["dce"])
    for name in fused_names:
        assert name in str(fused.program), f"the default pipeline did not fuse {name}"
    tokens = mx.array(ids(vocab, seed=5))
    err = max_diff(np.array(fused(tokens).logits), np.array(unfused(tokens).logits))
    assert err <= 1e-5, f"fused vs unfused: {err:.2e}"
    prompt = mx.array(ids(vocab, (1, 9), seed=6))
    kw = dict(max_new_tokens=12, temperature=0.0, stop_tokens=())
    assert np.array(fused.generate(prompt, **kw)).tolist() == np.array(unfused.generate(prompt, **kw)).tolist()


def check_quantize(path, vocab: int) -> None:
    """Quantized weights compile and run; 8-bit stays close to float (4-bit only has to run and be finite)."""
    tokens = mx.array(ids(vocab, seed=7))
    ref = np.array(mlxc.load(str(path))(tokens).logits)
    for bits in (8, 4):
        model = mlxc.load(str(path), quantize=bits, group_size=32)
        assert f"q{bits}g32" in str(model.program)
        out = np.array(model(tokens).logits)
        assert np.isfinite(out).all()
        if bits == 8:
            scale = np.abs(ref).max()
            assert max_diff(out, ref) <= 0.05 * scale, f"8-bit drifted {max_diff(out, ref):.3g} (scale {scale:.3g})"


def check_lora(path, vocab: int, targets: tuple[str, ...]) -> None:
    """A fresh adapter (B = 0) changes nothing; with non-zero B, merging gives the unmerged numbers."""
    import mlx.utils

    tokens = mx.array(ids(vocab, seed=8))
    base = np.array(mlxc.load(str(path))(tokens).logits)
    config = mlxc.LoRAConfig(rank=2, alpha=4.0, targets=targets)
    model = mlxc.load(str(path), lora=config)
    assert max_diff(np.array(model(tokens).logits), base) <= 1e-5
    rng = np.random.default_rng(9)
    trained = {n: mx.array(rng.normal(0, 0.05, size=a.shape).astype(np.float32))
               for n, a in mlx.utils.tree_flatten(model.net.parameters()) if ".lora_B." in n}
    assert trained, f"no adapters on {targets}"
    model.net.load_weights(list(trained.items()), strict=False)
    unmerged = np.array(model(tokens).logits)
    assert max_diff(unmerged, base) > 1e-4, "the adapters did not change the output"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mlxc.save_adapter(model, Path(d) / "adapter")
        merged = mlxc.load(str(path), adapter=Path(d) / "adapter", merge_lora=True)
        assert max_diff(np.array(merged(tokens).logits), unmerged) <= 1e-4


def check_artifact(path, tmp_path: Path, vocab: int) -> None:
    tokens = mx.array(ids(vocab, seed=10))
    direct = mlxc.load(str(path))
    out = mlxc.compile(str(path), tmp_path / "artifact")
    loaded = mlxc.load(out)
    assert max_diff(np.array(loaded(tokens).logits), np.array(direct(tokens).logits)) <= 1e-6


def meta_models(specs, config_for=None) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """Each spec's transformers causal LM built on the meta device (no memory) from the config mlxc writes for it
    (or `config_for(spec)`, a transformers config): {name: (class name, {parameter: shape})}, a tied head once.
    A rope warning from transformers while building the config fails (it validates the rope block against the
    context length, e.g. an original length beyond it)."""
    import logging

    import torch
    import transformers

    from mlxc.frontends.hf import hf_config_from_spec

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    log = logging.getLogger("transformers")
    handler, level = Collect(logging.WARNING), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    models = {}
    try:
        for name, spec in specs.items():
            warnings.clear()
            if config_for is None:
                data = hf_config_from_spec(spec)
                config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
            else:
                config = config_for(spec)
            assert not [w for w in warnings if "rope" in w.lower()], (name, warnings)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            models[name] = (type(model).__name__, {n: tuple(p.shape) for n, p in model.named_parameters()})
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return models
