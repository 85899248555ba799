"""The one place a matmul weight turns into what its matmul takes.

Every projection of the model (attention q/k/v/o, the MLP, the vocab head) reads its weight
through `weight` and multiplies through `jaxlm.models.mlp.linear`, which sends QArrays here:
  a QArray (ptq) stays quantized, its scales in the compute dtype, and the matmul goes through
    qwix (with int8 activations quantized per token first for dynamic-range quantization);
  a float weight under QAT is fake-quantized (`quantizer.fake_quantize`) then cast;
  any other weight is cast to the compute dtype, as before.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.models.quant import quantizer
from jaxlm.models.quant.qarray import is_qarray
from jaxlm.models.quant.spec import QuantSpec

Weight = Any  # a jax.Array or a qwix QArray


def weight(w: Weight, spec: QuantSpec, name: str, dtype: Any) -> Weight:
    """Weight `name` (one layer's) ready for its matmul in `dtype` (see the module docstring)."""
    if is_qarray(w):
        return w.astype(dtype)
    if spec.mode == "qat":
        w = quantizer.fake_quantize(w, spec, name)
    return w.astype(dtype)


def flatten(w: Weight, n_in: int) -> Weight:
    """w [in..., out...] as a matrix [prod(in), prod(out)]; a QArray's scales are flattened
    the same row-major way (a tile of the last input axis stays a tile of the flat axis)."""
    if not is_qarray(w):
        return w.reshape(math.prod(w.shape[:n_in]), -1)
    flat = lambda a: a.reshape(math.prod(a.shape[:n_in]), math.prod(a.shape[n_in:]))
    return type(w)(flat(w.qvalue), flat(w.scale),
                       None if w.zero_point is None else flat(w.zero_point), w.qtype)


def quantized_dense(x_BxLxI: jax.Array, w_IxO: Weight, activation: str) -> jax.Array:
    """x @ w for a quantized w, through qwix.einsum. activation "int8": x is quantized to int8
    with one scale per token (tiled like w's input axis), so the product is int8 x int8 with
    int32 accumulation where qwix can (per-channel or tiles of >= 128 inputs)."""
    import qwix  # loaded already: w is a QArray

    tiles = w_IxO.qvalue.shape[0] // w_IxO.scale.shape[0]
    if activation == "int8":
        tiled = {2: tiles} if w_IxO.scale.shape[0] > 1 else {}
        x_BxLxI = qwix.quantize(x_BxLxI, jnp.int8, channelwise_axes=(0, 1), tiled_axes=tiled)
    return qwix.einsum("bli,io->blo", x_BxLxI, w_IxO)


def initializer(init: Any, spec: QuantSpec, name: str) -> Any:
    """`init` for weight `name`, quantized when `spec` holds the weights quantized (so the
    model's abstract params, its shardings and restores are the QArray tree)."""
    if not spec.quantized:
        return init
    return lambda rng, shape, dtype=jnp.float32: quantizer.quantize_weight(
        init(rng, shape, dtype), spec, name)
