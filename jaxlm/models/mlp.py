"""The feed-forward block: SwiGLU (Llama), GeGLU (Gemma) or GELU (GPT-2), and the `dense`
matmul it uses."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import lora
from jaxlm.models.config import GATED_ACTIVATIONS, ModelConfig
from jaxlm.models.quant import matmul
from jaxlm.models.quant.qarray import is_qarray
from jaxlm.parallel import sharding


def weight_grad(x_BxLxI: jax.Array, dy_BxLxO: jax.Array) -> jax.Array:
    """dW [I, O] = sum over tokens of x^T dy, as a dot that XLA:CPU runs on its fast path.

    Plain autodiff writes this as a dot contracting the leading (token) axis of both operands.
    XLA:CPU runs such a dot on a slow generic path, or first transposes one operand, sometimes
    the larger one. Here the smaller of x, dy is transposed explicitly (an optimization barrier
    keeps that copy) so the dot is row-major with the contraction innermost, the form the fast
    (YNNPACK) path takes.
    """
    x_TxI = x_BxLxI.reshape(-1, x_BxLxI.shape[-1])
    dy_TxO = dy_BxLxO.reshape(-1, dy_BxLxO.shape[-1])
    if jax.default_backend() != "cpu":  # GPU/TPU compilers pick good layouts themselves
        return jnp.einsum("ti,to->io", x_TxI, dy_TxO)
    if x_TxI.shape[1] <= dy_TxO.shape[1]:
        return jnp.dot(jax.lax.optimization_barrier(x_TxI.T), dy_TxO)
    # The second barrier stops XLA from folding the final transpose back into the dot.
    dw_OxI = jnp.dot(jax.lax.optimization_barrier(dy_TxO.T), x_TxI)
    return jax.lax.optimization_barrier(dw_OxI).T


@jax.custom_vjp
def dense(x_BxLxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w over the last axis of x; the weight gradient goes through `weight_grad`."""
    return jnp.einsum("bli,io->blo", x_BxLxI, w_IxO)


def _dense_fwd(x_BxLxI, w_IxO):
    return dense(x_BxLxI, w_IxO), (x_BxLxI, w_IxO)


def _dense_bwd(res, dy_BxLxO):
    x_BxLxI, w_IxO = res
    dx_BxLxI = jnp.einsum("blo,io->bli", dy_BxLxO, w_IxO)
    return dx_BxLxI, weight_grad(x_BxLxI, dy_BxLxO).astype(w_IxO.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def linear(cfg: ModelConfig, x_BxLxI: jax.Array, w_IxO: matmul.Weight) -> jax.Array:
    """x @ w for every projection of the model: a quantized w through qwix
    (`jaxlm.models.quant.matmul.quantized_dense`), a float one through `dense`."""
    if is_qarray(w_IxO):
        return matmul.quantized_dense(x_BxLxI, w_IxO, cfg.quant.activation)
    return dense(x_BxLxI, w_IxO)


_HIDDEN = ("act_batch", "act_length", "act_mlp")


def _activate(activation: str, h_BxLxF: jax.Array, gate_BxLxF: jax.Array | None) -> jax.Array:
    if activation == "swiglu":
        return jax.nn.silu(gate_BxLxF) * h_BxLxF
    if activation == "geglu":
        return jax.nn.gelu(gate_BxLxF, approximate=True) * h_BxLxF
    return jax.nn.gelu(h_BxLxF, approximate=True)


def _pre_activations(x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF):
    h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_in_DxF)
    if b_in_F is not None:
        h_BxLxF += b_in_F
    gate_BxLxF = None
    if w_gate_DxF is not None:
        gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_gate_DxF)
    return h_BxLxF, gate_BxLxF


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mlp_core(activation: str, x_BxLxD: jax.Array, w_in_DxF: jax.Array, b_in_F: jax.Array | None,
             w_gate_DxF: jax.Array | None, w_out_FxD: jax.Array) -> jax.Array:
    """act(x @ w_in + b_in [, x @ w_gate]) @ w_out (output bias excluded).

    The backward pass keeps only the pre-activations ([tokens, d_ff], one per branch) and
    recomputes the activation from them: autodiff would also keep the activation output and the
    tanh inside GELU, two more [tokens, d_ff] arrays per layer. On CPU every saved array is
    fresh memory each step (page faults + traffic), which costs more than the recompute.
    """
    h_BxLxF, gate_BxLxF = _pre_activations(x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF)
    a_BxLxF = sharding.constrain(_activate(activation, h_BxLxF, gate_BxLxF), _HIDDEN)
    return jnp.einsum("blf,fd->bld", a_BxLxF, w_out_FxD)


def _mlp_core_fwd(activation, x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF, w_out_FxD):
    h_BxLxF, gate_BxLxF = _pre_activations(x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF)
    a_BxLxF = sharding.constrain(_activate(activation, h_BxLxF, gate_BxLxF), _HIDDEN)
    out_BxLxD = jnp.einsum("blf,fd->bld", a_BxLxF, w_out_FxD)
    return out_BxLxD, (x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF, w_out_FxD, h_BxLxF, gate_BxLxF)


def _mlp_core_bwd(activation, res, dout_BxLxD):
    x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF, w_out_FxD, h_BxLxF, gate_BxLxF = res
    da_BxLxF = sharding.constrain(jnp.einsum("bld,fd->blf", dout_BxLxD, w_out_FxD), _HIDDEN)
    a_BxLxF, act_vjp = jax.vjp(lambda h, g: _activate(activation, h, g), h_BxLxF, gate_BxLxF)
    dh_BxLxF, dgate_BxLxF = act_vjp(da_BxLxF)
    dw_out_FxD = weight_grad(a_BxLxF, dout_BxLxD).astype(w_out_FxD.dtype)
    dw_in_DxF = weight_grad(x_BxLxD, dh_BxLxF).astype(w_in_DxF.dtype)
    dx_BxLxD = jnp.einsum("blf,df->bld", dh_BxLxF, w_in_DxF)
    db_in_F = None if b_in_F is None else jnp.sum(dh_BxLxF, axis=(0, 1)).astype(b_in_F.dtype)
    dw_gate_DxF = None
    if w_gate_DxF is not None:
        dw_gate_DxF = weight_grad(x_BxLxD, dgate_BxLxF).astype(w_gate_DxF.dtype)
        dx_BxLxD += jnp.einsum("blf,df->bld", dgate_BxLxF, w_gate_DxF)
    return dx_BxLxD, dw_in_DxF, db_in_F, dw_gate_DxF, dw_out_FxD


mlp_core.defvjp(_mlp_core_fwd, _mlp_core_bwd)


class Mlp(nn.Module):
    cfg: ModelConfig

    def _weight(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]
                ) -> tuple[matmul.Weight, tuple[jax.Array, jax.Array] | None]:
        """Weight `name` as its matmul takes it (`jaxlm.models.quant.matmul.weight`: the compute
        dtype, or still quantized), and its LoRA adapter (None when not adapted)."""
        cfg = self.cfg
        init = matmul.initializer(nn.initializers.normal(cfg.init_std), cfg.quant, name)
        w = self.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)
        return (matmul.weight(w, cfg.quant, name, cfg.dtype),
                lora.adapter(self, name, shape, axes))

    def _bias(self, name: str, size: int, axis: str) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
                          (size,), self.cfg.weight_dtype).astype(self.cfg.dtype)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        w_in_DxF, a_in = self._weight("w_in", (d, f), ("embed", "mlp"))
        w_out_FxD, a_out = self._weight("w_out", (f, d), ("mlp", "embed"))
        b_in_F = self._bias("b_in", f, "mlp") if cfg.use_bias else None
        w_gate_DxF, a_gate = None, None
        if cfg.mlp_activation in GATED_ACTIVATIONS:
            w_gate_DxF, a_gate = self._weight("w_gate", (d, f), ("embed", "mlp"))
        quantized = is_qarray(w_in_DxF)
        if a_in is None and a_out is None and a_gate is None and not quantized:
            out_BxLxD = mlp_core(cfg.mlp_activation, x_BxLxD, w_in_DxF, b_in_F, w_gate_DxF,
                                 w_out_FxD)
        else:  # LoRA on the MLP (the adapter paths sit between the fused kernel's matmuls), or
            # quantized weights, which the fused kernel does not take
            dense_fn = functools.partial(linear, cfg)
            h_BxLxF = lora.project(self, dense_fn, x_BxLxD, w_in_DxF, a_in)
            if b_in_F is not None:
                h_BxLxF += b_in_F
            gate_BxLxF = None
            if w_gate_DxF is not None:
                gate_BxLxF = lora.project(self, dense_fn, x_BxLxD, w_gate_DxF, a_gate)
            a_BxLxF = sharding.constrain(_activate(cfg.mlp_activation, h_BxLxF, gate_BxLxF),
                                         _HIDDEN)
            out_BxLxD = lora.project(self, dense_fn, a_BxLxF, w_out_FxD, a_out)
        if cfg.use_bias:
            out_BxLxD += self._bias("b_out", d, "norm")
        return out_BxLxD
