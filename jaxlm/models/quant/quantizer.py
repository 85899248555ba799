"""The one quantizer: which parameters are matmul weights, and how each is quantized (qwix).

Every matmul weight W [in..., out...] (attention wq/wk/wv [D, H, K] and wo [H, K, D], MLP
w_in/w_gate [D, F] and w_out [F, D], the untied vocab head [D, V]) is quantized symmetrically
(absmax) with one scale per output channel over all its inputs, or, with a tile size T, one
scale per T consecutive values of its last input axis (the other input axes, wo's heads, then
get their own scales too). Parameters stacked over scanned layers keep one set of scales per
layer (the layer axis is channelwise), so the scan slices a QArray like any other leaf.

Embeddings (and a head tied to them), norms, biases, MoE experts and LoRA adapters stay
float. PTQ (`quantize_params`), QAT (`fake_quantize`) and the model's own quantized init all
call `quantize_weight`, so a QAT model converts to PTQ with no jump.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlm.models.quant.qarray import as_array, is_qarray
from jaxlm.models.quant.spec import BITS, QuantSpec

if TYPE_CHECKING:
    import qwix

# Leading (input) axes of each quantized weight, and its rank in one layer.
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_in": 1, "w_gate": 1, "w_out": 1, "head": 1}
WEIGHT_NDIM = {"wq": 3, "wk": 3, "wv": 3, "wo": 3, "w_in": 2, "w_gate": 2, "w_out": 2, "head": 2}
# The module a weight of INPUT_AXES must sit in to be quantized ("" = the model's top level).
_PARENTS = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w_in": "mlp",
            "w_gate": "mlp", "w_out": "mlp", "head": ""}


def quant_axes(name: str, ndim: int, tile_size: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """(channelwise axes, tiled axes) of weight `name` of rank `ndim` (leading axes beyond the
    weight's own rank are stacked layers): stacked and output axes are channelwise; with a tile
    size the last input axis is tiled and the other input axes are channelwise, without one
    every input axis shares the scale."""
    n_stacked, n_in = ndim - WEIGHT_NDIM[name], INPUT_AXES[name]
    last_in = n_stacked + n_in - 1
    channelwise = [a for a in range(ndim) if a < n_stacked or a > last_in]
    if not tile_size:
        return tuple(channelwise), {}
    channelwise += range(n_stacked, last_in)
    return tuple(sorted(channelwise)), {last_in: tile_size}


def quantize_weight(w: jax.Array, spec: QuantSpec, name: str) -> qwix.QArray:
    """Weight `name` ([stacked layers...,] in..., out...) as a QArray of spec.weight, with
    scales in w's dtype. nf4 codes are held in uint8 (checkpoints cannot store uint4)."""
    import qwix  # here, not at import (jaxlm/models/quant/qarray.py)

    channelwise, tiled = quant_axes(name, w.ndim, spec.tile_size)
    q = qwix.quantize(w, spec.qtype, channelwise_axes=channelwise, tiled_axes=tiled)
    if spec.weight == "nf4":
        q = dataclasses.replace(q, qvalue=q.qvalue.astype(jnp.uint8))
    return q


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quantize(w: jax.Array, spec: QuantSpec, name: str) -> jax.Array:
    """dequantize(quantize(w)) in the forward pass (exactly the weight PTQ computes with),
    identity in the backward pass (the straight-through estimator): quantization-aware
    training."""
    return as_array(quantize_weight(w, spec, name))


def _fake_quantize_fwd(w: jax.Array, spec: QuantSpec, name: str) -> tuple[jax.Array, None]:
    return fake_quantize(w, spec, name), None


def _fake_quantize_bwd(spec: QuantSpec, name: str, _: None, g: jax.Array
                       ) -> tuple[jax.Array]:
    return (g,)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def is_weight_path(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (dict keys) is a quantized matmul weight."""
    name = path[-1]
    if name not in _PARENTS:
        return False
    parent = path[-2] if len(path) > 1 else ""
    return parent == _PARENTS[name]


def quantize_params(params: Any, spec: QuantSpec) -> Any:
    """`params` with every matmul weight quantized (the tree the model with `spec` holds)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: quantize_weight(v, spec, k[-1]) if is_weight_path(k) else v
           for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def dequantize_params(params: Any) -> Any:
    """`params` with every QArray dequantized (a float tree a model without quant takes)."""
    return jax.tree.map(as_array, params, is_leaf=is_qarray)


def param_bytes(params: Any) -> int:
    """Bytes of `params` at their stored bits: int4/nf4 values count half a byte (packed),
    scales at their dtype."""
    total = 0.0
    for leaf in jax.tree.leaves(params, is_leaf=is_qarray):
        if is_qarray(leaf):
            bits = BITS.get(_weight_type(leaf.qtype), 8)
            total += leaf.qvalue.size * bits / 8 + leaf.scale.size * leaf.scale.dtype.itemsize
        else:
            total += leaf.size * leaf.dtype.itemsize
    return int(math.ceil(total))


def _weight_type(qtype: Any) -> str:
    return qtype if isinstance(qtype, str) else jnp.dtype(qtype).name
