"""A decoder-only transformer: embeddings, a stack of pre-norm blocks, final norm, vocab head.

Used as a pure function: `logits = Transformer(cfg).apply({"params": params}, inputs, ...)`.
Every parameter is created through `nn.with_logical_partitioning` so that `jaxlm.sharding` can
place it; blocks are stacked on a leading `layers` axis and run with `nn.scan` so compile time
does not grow with depth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models.attention import Attention
from jaxlm.models.config import ModelConfig
from jaxlm.models.mlp import Mlp, dense
from jaxlm.models.norms import Norm

_ACT = ("act_batch", "act_length", "act_embed")

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array) -> tuple[jax.Array, None]:
        x_BxLxD = sharding.constrain(x_BxLxD, _ACT)
        with jax.named_scope("attention"):
            h_BxLxD = Norm(self.cfg, name="attn_norm")(x_BxLxD)
            x_BxLxD = x_BxLxD + Attention(self.cfg, name="attn")(h_BxLxD, positions_BxL,
                                                                  segment_ids_BxL)
        with jax.named_scope("mlp"):
            h_BxLxD = Norm(self.cfg, name="mlp_norm")(x_BxLxD)
            x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(h_BxLxD)
        return sharding.constrain(x_BxLxD, _ACT), None


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Returns float32 logits [B, L, padded_vocab]; padded vocab entries are -1e9.

        With return_hidden=True returns (hidden_BxLxD, head_VxD) instead: the final-norm hidden
        states and the output projection (rows = padded vocab) in the compute dtype, for
        `jaxlm.loss.fused_cross_entropy_sum`, which never materialises the logits.
        """
        cfg = self.cfg
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(inputs_BxL)
        init = nn.initializers.normal(cfg.init_std)
        embed_VxD = self.param("embed", nn.with_logical_partitioning(init, ("vocab", "embed")),
                               (cfg.padded_vocab_size, cfg.d_model), cfg.weight_dtype)
        x_BxLxD = jnp.take(embed_VxD, inputs_BxL, axis=0).astype(cfg.dtype)
        if cfg.position_embedding == "learned":
            pos_PxD = self.param("pos_embed",
                                 nn.with_logical_partitioning(init, ("positions", "embed")),
                                 (cfg.max_seq_len, cfg.d_model), cfg.weight_dtype)
            x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD = sharding.constrain(x_BxLxD, _ACT)

        block_cls = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = stack(cfg, name="blocks")(x_BxLxD, positions_BxL, segment_ids_BxL)
        else:
            for i in range(cfg.num_layers):
                x_BxLxD, _ = block_cls(cfg, name=f"block_{i}")(x_BxLxD, positions_BxL,
                                                               segment_ids_BxL)

        x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            head_VxD = embed_VxD.astype(cfg.dtype)
        else:
            head_DxV = self.param("head", nn.with_logical_partitioning(init, ("embed", "vocab")),
                                  (cfg.d_model, cfg.padded_vocab_size), cfg.weight_dtype)
            head_VxD = head_DxV.astype(cfg.dtype).T
        if cfg.reward_head:  # a reward model: one float32 score per position [B, L]
            w_D = self.param("reward_head", nn.with_logical_partitioning(
                nn.initializers.zeros, ("embed",)), (cfg.d_model,), cfg.weight_dtype)
            return jnp.einsum("bld,d->bl", x_BxLxD, w_D.astype(cfg.dtype)).astype(jnp.float32)
        if return_hidden:
            return x_BxLxD, head_VxD
        logits_BxLxV = dense(x_BxLxD, head_VxD.T)
        logits_BxLxV = sharding.constrain(logits_BxLxV.astype(jnp.float32),
                                          ("act_batch", "act_length", "act_vocab"))
        if cfg.padded_vocab_size != cfg.vocab_size:
            real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BxLxV = jnp.where(real_V, logits_BxLxV, -1e9)
        return logits_BxLxV
