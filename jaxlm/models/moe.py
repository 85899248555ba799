"""Mixture-of-experts feed-forward block: top-k routing with capacity, expert parallelism.

Each sequence of a batch is one routing *group* (GShard). Per token, a float32 router picks the
top-k of E experts; every expert has `capacity` slots per group, filled in priority order: all
tokens' first choices (in token order), then all second choices. An assignment that finds its
expert full is dropped: it adds nothing, so a token dropped by all its experts leaves the block
with zero MLP output and the residual carries it on unchanged. `dropless` makes the capacity the
group length, so nothing can be dropped.

Gates: k=1 uses the router probability of the chosen expert (Switch Transformer), so the router
learns through the main loss; k=2 renormalises the two chosen probabilities to sum to 1 (GShard).

Data movement: tokens are gathered into a dispatch buffer [B, E, C, D] (batch-sharded, like every
activation), which is then re-constrained to [E, B, C, D] with the experts dimension on the
`expert` mesh axis. The batch was split over (data, fsdp, expert), so moving the `expert` split
from the batch to the experts dimension is an all-to-all, which XLA's SPMD partitioner emits for
this resharding (GShard's construction; tests/test_moe.py checks the compiled HLO contains it).
The experts' MLPs run locally on their shard, and the reverse constraint is the second
all-to-all. Capacity keeps every shape static.

Auxiliary losses, over the non-padding tokens of the batch (returned per block, averaged over the
MoE blocks by `Transformer`, weighted and added to the loss by `add_router_losses`):
  * balance_loss = E * sum_e f_e * P_e (Switch Transformer eq. 4), with f_e the fraction of the
    k * tokens assignments whose choice is e (before capacity) and P_e the mean router
    probability of e; 1 when routing is uniform, E when it collapses on one expert;
  * router_z_loss = mean over tokens of logsumexp(router logits)^2 (ST-MoE, Zoph et al. 2022);
  * dropped_fraction (a metric, no gradient): dropped assignments / (k * tokens).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig
from jaxlm.models.mlp import _activate
from jaxlm.parallel import sharding

_BUFFER_B = ("act_batch", "act_expert", None, "act_embed")
_BUFFER_E = ("act_expert", "act_batch", None, "act_embed")
_HIDDEN_E = ("act_expert", "act_batch", None, "act_mlp")


class Routing(NamedTuple):
    """Where each token goes. Slots are numbered e * capacity + position; E * capacity = none.

    slot_token_BxExC: the token (index in its sequence) in each expert slot; L for an empty slot.
    slot_BxLxK: the slot of each token's k-th assignment; E * capacity when it was dropped.
    gate_BxLxK: the weight of each assignment's expert output (0 when dropped), float32.
    stats: scalar balance_loss, router_z_loss, dropped_fraction (see the module docstring).
    """

    slot_token_BxExC: jax.Array
    slot_BxLxK: jax.Array
    gate_BxLxK: jax.Array
    stats: dict[str, jax.Array]


def _top_k(probs_BxLxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest probabilities, as k masked argmaxes.

    Same result as `jax.lax.top_k` for small k, but XLA's SPMD partitioner splits argmax along
    the batch like any reduction, whereas it all-gathers the whole [B, L, E] input of top_k.
    """
    values, indices = [], []
    remaining_BxLxE = probs_BxLxE
    for _ in range(k):
        index_BxL = jnp.argmax(remaining_BxLxE, axis=-1)
        chosen_BxLxE = jax.nn.one_hot(index_BxL, probs_BxLxE.shape[-1], dtype=bool)
        values.append(jnp.sum(jnp.where(chosen_BxLxE, probs_BxLxE, 0.0), axis=-1))
        indices.append(index_BxL.astype(jnp.int32))
        remaining_BxLxE = jnp.where(chosen_BxLxE, -1.0, remaining_BxLxE)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def route(logits_BxLxE: jax.Array, top_k: int, capacity: int,
          valid_BxL: jax.Array | None = None) -> Routing:
    """Top-k routing of every sequence with `capacity` slots per expert; invalid (padding)
    tokens take no slot and do not count in the statistics."""
    b, length, e = logits_BxLxE.shape
    logits_BxLxE = logits_BxLxE.astype(jnp.float32)
    if valid_BxL is None:
        valid_BxL = jnp.ones((b, length), bool)
    probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
    gate_BxLxK, expert_BxLxK = _top_k(probs_BxLxE, top_k)
    if top_k > 1:
        gate_BxLxK = gate_BxLxK / jnp.sum(gate_BxLxK, axis=-1, keepdims=True)

    # Queue order within a sequence: every token's first choice, then every second choice.
    expert_BxN = expert_BxLxK.transpose(0, 2, 1).reshape(b, top_k * length)
    valid_BxN = jnp.tile(valid_BxL, (1, top_k))
    onehot_BxNxE = jax.nn.one_hot(expert_BxN, e, dtype=jnp.int32) * valid_BxN[..., None]
    position_BxN = jnp.sum((jnp.cumsum(onehot_BxNxE, axis=1) - 1) * onehot_BxNxE, axis=-1)
    kept_BxN = valid_BxN & (position_BxN < capacity)
    none = e * capacity
    slot_BxN = jnp.where(kept_BxN, expert_BxN * capacity + position_BxN, none)
    token_N = jnp.tile(jnp.arange(length, dtype=jnp.int32), top_k)
    fill = jnp.full((none + 1,), length, jnp.int32)
    slot_token_BxS = jax.vmap(lambda slots: fill.at[slots].set(token_N))(slot_BxN)
    slot_BxLxK = slot_BxN.reshape(b, top_k, length).transpose(0, 2, 1)

    valid_f_BxL = valid_BxL.astype(jnp.float32)
    num_tokens = jnp.maximum(jnp.sum(valid_f_BxL), 1.0)
    # Sums per sequence first, then over the batch: each device reduces its own sequences and
    # only [E]-sized partial sums cross devices.
    count_E = jnp.sum(jnp.sum(onehot_BxNxE, axis=1), axis=0).astype(jnp.float32)
    prob_sum_E = jnp.sum(jnp.einsum("ble,bl->be", probs_BxLxE, valid_f_BxL), axis=0)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxE, axis=-1)
    stats = {
        "balance_loss": e * jnp.sum(count_E * prob_sum_E) / (num_tokens * num_tokens * top_k),
        "router_z_loss": jnp.sum(jnp.square(log_z_BxL) * valid_f_BxL) / num_tokens,
        "dropped_fraction": 1.0 - jnp.sum(kept_BxN) / (num_tokens * top_k),
    }
    return Routing(slot_token_BxExC=slot_token_BxS[:, :none].reshape(b, e, capacity),
                   slot_BxLxK=slot_BxLxK,
                   gate_BxLxK=jnp.where(slot_BxLxK < none, gate_BxLxK, 0.0), stats=stats)


def dispatch(x_BxLxD: jax.Array, slot_token_BxExC: jax.Array) -> jax.Array:
    """The expert input buffer [B, E, C, D]: each slot's token, zeros in empty slots."""
    x_pad_BxL1xD = jnp.pad(x_BxLxD, ((0, 0), (0, 1), (0, 0)))
    return jax.vmap(lambda x, idx: x[idx])(x_pad_BxL1xD, slot_token_BxExC)


def combine(y_BxExCxD: jax.Array, slot_BxLxK: jax.Array, gate_BxLxK: jax.Array) -> jax.Array:
    """Each token's gate-weighted sum of its experts' outputs [B, L, D]."""
    b, e, c, d = y_BxExCxD.shape
    y_BxS1xD = jnp.pad(y_BxExCxD.reshape(b, e * c, d), ((0, 0), (0, 1), (0, 0)))
    picked_BxLxKxD = jax.vmap(lambda y, idx: y[idx])(y_BxS1xD, slot_BxLxK)
    return jnp.einsum("blkd,blk->bld", picked_BxLxKxD, gate_BxLxK.astype(y_BxExCxD.dtype))


class MoeMlp(nn.Module):
    """E expert MLPs (the activation of `cfg.mlp_activation`) behind a top-k router.

    Returns (output [B, L, D], stats of `route`).
    """

    cfg: ModelConfig

    def _param(self, name: str, init: Any, shape: tuple[int, ...],
               axes: tuple[str | None, ...]) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                          self.cfg.weight_dtype)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg, moe = self.cfg, self.cfg.moe
        e, d, f = moe.num_experts, cfg.d_model, cfg.d_ff
        normal, zeros = nn.initializers.normal(cfg.init_std), nn.initializers.zeros
        w_router_DxE = self._param("router", normal, (d, e), ("embed", None))
        logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32),
                                  w_router_DxE.astype(jnp.float32))
        routing = route(logits_BxLxE, moe.top_k, moe.capacity(x_BxLxD.shape[1]), valid_BxL)

        x_BxExCxD = sharding.constrain(dispatch(x_BxLxD, routing.slot_token_BxExC), _BUFFER_B)
        x_ExBxCxD = sharding.constrain(x_BxExCxD.transpose(1, 0, 2, 3), _BUFFER_E)  # all-to-all

        def weight(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            return self._param(name, normal, shape, axes).astype(cfg.dtype)

        h_ExBxCxF = jnp.einsum("ebcd,edf->ebcf", x_ExBxCxD,
                               weight("w_in", (e, d, f), ("expert", "embed", "mlp")))
        if cfg.use_bias:
            b_in_ExF = self._param("b_in", zeros, (e, f), ("expert", "mlp")).astype(cfg.dtype)
            h_ExBxCxF += b_in_ExF[:, None, None, :]
        gate_ExBxCxF = None
        if cfg.mlp_activation == "swiglu":
            gate_ExBxCxF = jnp.einsum("ebcd,edf->ebcf", x_ExBxCxD,
                                      weight("w_gate", (e, d, f), ("expert", "embed", "mlp")))
        a_ExBxCxF = sharding.constrain(_activate(cfg.mlp_activation, h_ExBxCxF, gate_ExBxCxF),
                                       _HIDDEN_E)
        y_ExBxCxD = jnp.einsum("ebcf,efd->ebcd", a_ExBxCxF,
                               weight("w_out", (e, f, d), ("expert", "mlp", "embed")))
        if cfg.use_bias:
            b_out_ExD = self._param("b_out", zeros, (e, d), ("expert", "norm")).astype(cfg.dtype)
            y_ExBxCxD += b_out_ExD[:, None, None, :]
        y_ExBxCxD = sharding.constrain(y_ExBxCxD, _BUFFER_E)
        y_BxExCxD = sharding.constrain(y_ExBxCxD.transpose(1, 0, 2, 3), _BUFFER_B)  # all-to-all
        return combine(y_BxExCxD, routing.slot_BxLxK, routing.gate_BxLxK), routing.stats


def add_router_losses(loss_sum: jax.Array, aux: dict[str, jax.Array], variables: Any,
                      cfg: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Adds the weighted MoE losses to a summed token loss and their sums to its aux.

    `variables` is the mutable output of `model.apply(..., mutable=["intermediates"])`, where
    `Transformer` sows the router stats averaged over its MoE blocks. The losses are per-token
    means, so they enter as mean * num_tokens: the step's division by the token count (also
    across microbatches) turns them back into token-weighted means. Aux gains `moe_<stat>_sum`.
    """
    if cfg.moe is None:
        return loss_sum, aux
    stats = variables["intermediates"]["moe"][0]
    num_tokens = aux["num_tokens"]
    weighted = (cfg.moe.aux_loss_weight * stats["balance_loss"]
                + cfg.moe.router_z_loss_weight * stats["router_z_loss"])
    aux = dict(aux, **{f"moe_{k}_sum": v * num_tokens for k, v in stats.items()})
    return loss_sum + weighted * num_tokens, aux


def router_metrics(sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
    """Per-token (or per-pair) means of the `moe_<stat>_sum` entries `add_router_losses` put in
    a step's aux sums: moe_balance_loss, moe_router_z_loss, moe_dropped_fraction."""
    return {k.removesuffix("_sum"): v / denom for k, v in sums.items() if k.startswith("moe_")}
