"""A decoder-only transformer: embeddings, a stack of pre-norm blocks, final norm, vocab head.

Used as a pure function: `logits = Transformer(cfg).apply({"params": params}, inputs, ...)`.
Every parameter is created through `nn.with_logical_partitioning` so that `jaxlm.parallel.sharding`
can
place it; blocks are stacked on a leading `layers` axis and run with `nn.scan` so compile time
does not grow with depth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import pipeline
from jaxlm.models.attention import Attention
from jaxlm.models.config import ModelConfig
from jaxlm.models.mlp import Mlp, linear
from jaxlm.models.moe import MoeMlp
from jaxlm.models.norms import Norm
from jaxlm.models.quant import matmul, qarray
from jaxlm.models.softcap import softcap
from jaxlm.parallel import sharding

_ACT = ("act_batch", "act_length", "act_embed")

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with
    `cfg.post_norms`, x + norm(attn(norm(x))) and x + norm(mlp(norm(x))) (Gemma).

    With `moe` the MLP is a mixture of experts and the block also returns its router stats.
    """

    cfg: ModelConfig
    decode: bool = False
    moe: bool = False
    window: int = -1  # this block's sliding window; -1: the model's (cfg.sliding_window)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array, layer_window: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        x_BxLxD = sharding.constrain(x_BxLxD, _ACT)
        window = self.cfg.sliding_window if self.window < 0 else self.window
        with jax.named_scope("attention"):
            h_BxLxD = Norm(self.cfg, name="attn_norm")(x_BxLxD)
            attn = Attention(self.cfg, self.decode, window, name="attn")
            h_BxLxD = attn(h_BxLxD, positions_BxL, segment_ids_BxL, layer_window)
            if self.cfg.post_norms:
                h_BxLxD = Norm(self.cfg, name="post_attn_norm")(h_BxLxD)
            x_BxLxD = x_BxLxD + h_BxLxD
        with jax.named_scope("mlp"):
            h_BxLxD = Norm(self.cfg, name="mlp_norm")(x_BxLxD)
            stats = None
            if self.moe:
                h_BxLxD, stats = MoeMlp(self.cfg, name="moe")(h_BxLxD, segment_ids_BxL > 0)
            else:
                h_BxLxD = Mlp(self.cfg, name="mlp")(h_BxLxD)
            if self.cfg.post_norms:
                h_BxLxD = Norm(self.cfg, name="post_mlp_norm")(h_BxLxD)
            x_BxLxD = x_BxLxD + h_BxLxD
        return sharding.constrain(x_BxLxD, _ACT), stats


class BlockGroup(nn.Module):
    """`cfg.moe.every` consecutive blocks, the last one MoE: the unit that is scanned when only
    every k-th block is MoE."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        block_cls, every = _block_class(self.cfg), self.cfg.moe.every
        for i in range(every):
            block = block_cls(self.cfg, self.decode, moe=i == every - 1, name=f"block_{i}")
            x_BxLxD, stats = block(x_BxLxD, positions_BxL, segment_ids_BxL)
        return x_BxLxD, stats


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def _pipelined_blocks(cfg: ModelConfig, blocks: dict, x_BxLxD: jax.Array,
                      positions_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """The stacked blocks [L, ...] as P = `cfg.pipeline_stages` stages holding
    V = `cfg.pipeline_repeats` chunks of L/(P*V) layers each, run over microbatches with the
    GPipe (V = 1) or circular (V > 1) schedule of `jaxlm.models.pipeline`."""
    block = _block_class(cfg)(cfg, parent=None)

    def stage(params_l: dict, x_bxLxD: jax.Array, pos_bxL: jax.Array,
              seg_bxL: jax.Array) -> jax.Array:
        def layer(x: jax.Array, params: dict) -> tuple[jax.Array, None]:
            return block.apply({"params": params}, x, pos_bxL, seg_bxL)[0], None
        return jax.lax.scan(layer, x_bxLxD, params_l)[0]

    m = pipeline.num_microbatches(x_BxLxD.shape[0], cfg.pipeline_microbatches)
    split = lambda a: pipeline.split_microbatches(a, m)
    stage_params = pipeline.to_stages(blocks, cfg.pipeline_stages, cfg.pipeline_repeats)
    out_MxBxLxD = pipeline.circular(
        stage, stage_params, split(x_BxLxD),
        (split(positions_BxL), split(segment_ids_BxL)), x_axes=_ACT,
        side_axes=(_ACT[:2], _ACT[:2]))
    return sharding.constrain(pipeline.merge_microbatches(out_MxBxLxD), _ACT)


class Transformer(nn.Module):
    """decode=True: autoregressive decoding over a KV cache (`jaxlm.models.kv_cache`)."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, inputs_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, *, return_hidden: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Returns float32 logits [B, L, padded_vocab], soft-capped by cfg.final_logit_softcap;
        padded vocab entries are -1e9.

        With return_hidden=True returns (hidden_BxLxD, head_VxD) instead: the final-norm hidden
        states and the output projection (rows = padded vocab) in the compute dtype,
        for `jaxlm.losses.cross_entropy.fused_cross_entropy_sum`, which never materialises
        the logits (pass it logit_softcap=cfg.final_logit_softcap).
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
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(d_model)
            x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model**0.5, cfg.dtype)
        if cfg.position_embedding == "learned":
            pos_PxD = self.param("pos_embed",
                                 nn.with_logical_partitioning(init, ("positions", "embed")),
                                 (cfg.max_seq_len, cfg.d_model), cfg.weight_dtype)
            x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD = sharding.constrain(x_BxLxD, _ACT)

        block_cls = _block_class(cfg)
        if cfg.pipeline_stages > 1 and not self.is_initializing() and not self.decode:
            # Same parameters as the scan below (which init runs), applied stage by stage.
            x_BxLxD = _pipelined_blocks(cfg, nn.meta.unbox(self.variables["params"]["blocks"]),
                                        x_BxLxD, positions_BxL, segment_ids_BxL)
            stats = None
        elif cfg.scan_layers:
            unit, length, kwargs = block_cls, cfg.num_layers, {"moe": cfg.moe is not None}
            if cfg.moe is not None and cfg.moe.every > 1:
                unit, length, kwargs = BlockGroup, cfg.num_layers // cfg.moe.every, {}
            # Alternating local/global layers: each layer's window is a scanned input.
            windows = ((jnp.asarray([cfg.layer_window(i) for i in range(length)], jnp.int32),)
                       if cfg.mixed_windows else ())
            stack = nn.scan(unit, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast) + (0,) * len(windows),
                            length=length, metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, stats = stack(cfg, self.decode, name="blocks", **kwargs)(
                x_BxLxD, positions_BxL, segment_ids_BxL, *windows)
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                block = block_cls(cfg, self.decode, moe=cfg.is_moe_layer(i),
                                  window=cfg.layer_window(i), name=f"block_{i}")
                x_BxLxD, stats = block(x_BxLxD, positions_BxL, segment_ids_BxL)
                per_layer += [stats] if stats is not None else []
            stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if per_layer else None
        if stats is not None:  # router stats of the MoE blocks, for `moe.add_router_losses`
            self.sow("intermediates", "moe", jax.tree.map(jnp.mean, stats))

        x_BxLxD = Norm(cfg, name="final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            head_DxV = embed_VxD.astype(cfg.dtype).T
        else:
            head_init = matmul.initializer(init, cfg.quant, "head")
            head_DxV = self.param("head", nn.with_logical_partitioning(
                head_init, ("embed", "vocab")), (cfg.d_model, cfg.padded_vocab_size),
                cfg.weight_dtype)
            head_DxV = matmul.weight(head_DxV, cfg.quant, "head", cfg.dtype)
        if cfg.reward_head:  # a reward model: one float32 score per position [B, L]
            w_D = self.param("reward_head", nn.with_logical_partitioning(
                nn.initializers.zeros, ("embed",)), (cfg.d_model,), cfg.weight_dtype)
            return jnp.einsum("bld,d->bl", x_BxLxD, w_D.astype(cfg.dtype)).astype(jnp.float32)
        if return_hidden:  # the chunked loss takes a plain head (a quantized one dequantized)
            return x_BxLxD, qarray.as_array(head_DxV).T
        logits_BxLxV = linear(cfg, x_BxLxD, head_DxV)
        logits_BxLxV = softcap(logits_BxLxV.astype(jnp.float32), cfg.final_logit_softcap)
        logits_BxLxV = sharding.constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))
        if cfg.padded_vocab_size != cfg.vocab_size:
            real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BxLxV = jnp.where(real_V, logits_BxLxV, -1e9)
        return logits_BxLxV
