"""LoRA: low-rank adapters on the weight matrices of attention (and optionally the MLP).

An adapted weight W [in..., out...] gets two parameters next to it, `<name>_lora_a`
[in..., r] (normal init, std 1 / sqrt(fan_in)) and `<name>_lora_b` [r, out...] (zeros), and the
layer uses W + (alpha / r) A B. With B = 0 the model computes exactly the base model; training
only A and B (see `jaxlm.optim.train_only`) keeps the base weights and their optimizer state
untouched. The adapted weight is formed before the layer's matmul, so the layers' fused kernels
are used unchanged (the extra cost is one [in, r] x [r, out] product per weight and step).

`merge` folds trained adapters into the base weights: a plain model then gives the same
logits (tools/merge_lora.py).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w_in", "w_gate", "w_out")
# Leading (input) axes of each target; the rest are output axes.
_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_in": 1, "w_gate": 1, "w_out": 1}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def scale(rank: int, alpha: float) -> float:
    return alpha / rank


def adapt(module: nn.Module, name: str, w: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`w` (already in the compute dtype) plus its adapter, if module.cfg adapts `name`."""
    cfg = module.cfg
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return w
    n_in, r = _INPUT_AXES[name], cfg.lora_rank
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    fan_in = math.prod(in_shape)
    a = module.param(name + SUFFIX_A, nn.with_logical_partitioning(
        nn.initializers.normal(fan_in ** -0.5), (*axes[:n_in], None)), (*in_shape, r),
        cfg.weight_dtype).astype(cfg.dtype)
    b = module.param(name + SUFFIX_B, nn.with_logical_partitioning(
        nn.initializers.zeros, (None, *axes[n_in:])), (r, *out_shape),
        cfg.weight_dtype).astype(cfg.dtype)
    delta = jnp.dot(a.reshape(fan_in, r), b.reshape(r, -1)).reshape(w.shape)
    return w + jnp.asarray(scale(r, cfg.lora_alpha), cfg.dtype) * delta


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    keys = [getattr(k, "key", k) for k in path]
    return bool(keys) and str(keys[-1]).endswith((SUFFIX_A, SUFFIX_B))


def adapter_mask(params: Any) -> Any:
    """True on adapter leaves, False on base weights."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter_path(p), params)


def split(params: dict) -> tuple[dict, dict]:
    """(base params, adapter params) as two nested dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    adapters = {k: v for k, v in flat.items() if k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge(params: dict, rank: int, alpha: float) -> dict:
    """Base params with every adapter folded in: W + (alpha / r) A B (scanned layers too)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    for key in flat:
        if not key[-1].endswith(SUFFIX_A):
            continue
        name = key[-1][:-len(SUFFIX_A)]
        w_key = (*key[:-1], name)
        a, b, w = flat[key], flat[(*key[:-1], name + SUFFIX_B)], flat[w_key]
        stacked = a.ndim - _INPUT_AXES[name] - 1  # 1 for params stacked over scanned layers
        a2 = a.reshape(*a.shape[:stacked], -1, rank)
        b2 = b.reshape(*b.shape[:stacked], rank, -1)
        delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(w.shape)
        out[w_key] = (w.astype(jnp.float32) + scale(rank, alpha) * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def count(params: Any) -> dict[str, int]:
    """Parameter counts: total, trainable (adapters) and frozen."""
    sizes = jax.tree_util.tree_map_with_path(lambda p, x: (is_adapter_path(p), x.size), params)
    leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    adapters = sum(n for is_a, n in leaves if is_a)
    total = sum(n for _, n in leaves)
    return {"total": total, "trainable": adapters, "frozen": total - adapters}
