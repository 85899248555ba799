"""LoRA: low-rank adapters on the weight matrices of attention (and optionally the MLP).

An adapted weight W [in..., out...] gets two parameters next to it, `<name>_lora_a`
[in..., r] (normal init, std 1 / sqrt(fan_in)) and `<name>_lora_b` [r, out...] (zeros), and the
layer computes x W + (alpha / r) dropout(x) A B: the adapter is its own low-rank path beside the
frozen weight, with dropout (`lora_dropout`, the "dropout" rng) on the adapter's input only, as
in the LoRA paper. With B = 0 the model computes exactly the base model.

Only the adapters (and a reward model's head) train: `trainable_mask` marks them, `jaxlm.run.optim.
train_only` gives the rest no optimizer state, and `freeze` stops gradients at the frozen leaves,
so no weight gradient of a frozen matrix is computed at all (the adapter path costs
2 T r (in + out) per weight instead).

`merge` folds trained adapters into the base weights: a plain model then gives the same
logits (jaxlm/tools/merge_lora.py). With `quant.mode="ptq"` the frozen base is held quantized
(QLoRA, docs/quantization.md): the adapters stay float and `merge` dequantizes the base.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlm.models.quant.qarray import as_array

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w_in", "w_gate", "w_out")
# Leading (input) axes of each target; the rest are output axes.
_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_in": 1, "w_gate": 1, "w_out": 1}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
# Leaves that train next to the adapters: a reward model's scalar head starts at zero.
TRAINABLE_WITH_ADAPTERS = ("reward_head",)


def scale(rank: int, alpha: float) -> float:
    return alpha / rank


def adapter(module: nn.Module, name: str, w_shape: tuple[int, ...], axes: tuple[str, ...]
            ) -> tuple[jax.Array, jax.Array] | None:
    """(A [in, r], B [r, out]) of weight `name` flattened to 2-D in the compute dtype, or None
    when module.cfg does not adapt `name`."""
    cfg = module.cfg
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return None
    n_in, r = _INPUT_AXES[name], cfg.lora_rank
    in_shape, out_shape = w_shape[:n_in], w_shape[n_in:]
    fan_in = math.prod(in_shape)
    a = module.param(name + SUFFIX_A, nn.with_logical_partitioning(
        nn.initializers.normal(fan_in ** -0.5), (*axes[:n_in], None)), (*in_shape, r),
        cfg.weight_dtype)
    b = module.param(name + SUFFIX_B, nn.with_logical_partitioning(
        nn.initializers.zeros, (None, *axes[n_in:])), (r, *out_shape), cfg.weight_dtype)
    return (a.reshape(fan_in, r).astype(cfg.dtype),
            b.reshape(r, math.prod(out_shape)).astype(cfg.dtype))


def delta(module: nn.Module, x_BxLxI: jax.Array,
          adapter_pair: tuple[jax.Array, jax.Array]) -> jax.Array:
    """(alpha / r) dropout(x) A B [B, L, out]; dropout only when the module has a "dropout"
    rng (training steps pass one; evaluation and sampling do not)."""
    cfg = module.cfg
    a_IxR, b_RxO = adapter_pair
    if cfg.lora_dropout > 0 and module.has_rng("dropout"):
        keep = 1.0 - cfg.lora_dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x_BxLxI.shape)
        x_BxLxI = jnp.where(mask, x_BxLxI / jnp.asarray(keep, x_BxLxI.dtype), 0)
    low_BxLxR = jnp.einsum("bli,ir->blr", x_BxLxI, a_IxR)
    return jnp.asarray(scale(cfg.lora_rank, cfg.lora_alpha), x_BxLxI.dtype) * jnp.einsum(
        "blr,ro->blo", low_BxLxR, b_RxO)


def project(module: nn.Module, dense_fn: Any, x_BxLxI: jax.Array, w_IxO: jax.Array,
            adapter_pair: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """dense_fn(x, w) plus the adapter path when there is one."""
    y_BxLxO = dense_fn(x_BxLxI, w_IxO)
    if adapter_pair is None:
        return y_BxLxO
    return y_BxLxO + delta(module, x_BxLxI, adapter_pair)


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    keys = [getattr(k, "key", k) for k in path]
    return bool(keys) and str(keys[-1]).endswith((SUFFIX_A, SUFFIX_B))


def adapter_mask(params: Any) -> Any:
    """True on adapter leaves, False on base weights."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter_path(p), params)


def _trainable_path(path: tuple[Any, ...]) -> bool:
    keys = [str(getattr(k, "key", k)) for k in path]
    return is_adapter_path(path) or any(k in TRAINABLE_WITH_ADAPTERS for k in keys)


def trainable_mask(params: Any) -> Any:
    """True on the leaves a LoRA run trains: the adapters and a reward head."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _trainable_path(p), params)


def freeze(params: Any) -> Any:
    """`params` with gradients stopped at every leaf `trainable_mask` leaves out."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _trainable_path(p) else jax.lax.stop_gradient(x), params)


def split(params: dict) -> tuple[dict, dict]:
    """(base params, adapter params) as two nested dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    adapters = {k: v for k, v in flat.items() if k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge(params: dict, rank: int, alpha: float) -> dict:
    """Base params with every adapter folded in: W + (alpha / r) A B (scanned layers too)."""
    flat = traverse_util.flatten_dict(params)
    # QLoRA: every quantized base weight comes out float, adapted or not
    out = {k: as_array(v)
           for k, v in flat.items() if not k[-1].endswith((SUFFIX_A, SUFFIX_B))}
    for key in flat:
        if not key[-1].endswith(SUFFIX_A):
            continue
        name = key[-1][:-len(SUFFIX_A)]
        w_key = (*key[:-1], name)
        a, b, w = flat[key], flat[(*key[:-1], name + SUFFIX_B)], flat[w_key]
        w = as_array(w)
        stacked = a.ndim - _INPUT_AXES[name] - 1  # 1 for params stacked over scanned layers
        a2 = a.reshape(*a.shape[:stacked], -1, rank)
        b2 = b.reshape(*b.shape[:stacked], rank, -1)
        delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(w.shape)
        out[w_key] = (w.astype(jnp.float32) + scale(rank, alpha) * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def count(params: Any) -> dict[str, int]:
    """Parameter counts: total, trainable (adapters, reward head) and frozen."""
    sizes = jax.tree_util.tree_map_with_path(lambda p, x: (_trainable_path(p), x.size), params)
    leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    adapters = sum(n for is_a, n in leaves if is_a)
    total = sum(n for _, n in leaves)
    return {"total": total, "trainable": adapters, "frozen": total - adapters}
