"""The feed-forward block: SwiGLU (Llama) or GELU (GPT-2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models.config import ModelConfig


class Mlp(nn.Module):
    cfg: ModelConfig

    def _weight(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        init = nn.initializers.normal(self.cfg.init_std)
        return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                          self.cfg.weight_dtype).astype(self.cfg.dtype)

    def _bias(self, name: str, size: int, axis: str) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
                          (size,), self.cfg.weight_dtype).astype(self.cfg.dtype)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        w_in_DxF = self._weight("w_in", (d, f), ("embed", "mlp"))
        w_out_FxD = self._weight("w_out", (f, d), ("mlp", "embed"))
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_in_DxF)
        if cfg.use_bias:
            h_BxLxF += self._bias("b_in", f, "mlp")
        if cfg.mlp_activation == "swiglu":
            w_gate_DxF = self._weight("w_gate", (d, f), ("embed", "mlp"))
            gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_gate_DxF)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        h_BxLxF = sharding.constrain(h_BxLxF, ("act_batch", "act_length", "act_mlp"))
        out_BxLxD = jnp.einsum("blf,fd->bld", h_BxLxF, w_out_FxD)
        if cfg.use_bias:
            out_BxLxD += self._bias("b_out", d, "norm")
        return out_BxLxD
