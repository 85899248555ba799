"""GRPO: group-relative policy optimisation with verifiable rewards (Shao et al. 2024).

One step (`GrpoLoop.train`, the stage's `StepLoop`):

1. rollout (jit, the Program's "rollout"): G completions of each of the batch's prompts from
   the KV-cache decoder, with the policy's params as sharded for training, and their
   per-token log-probs pi_old;
2. host: decode, score with the configured rewards, group advantages
   A_i = (r_i - mean_G r) / std_G r (rl.advantage_scale="none": no division, Dr. GRPO) and each
   token's weight in the loss (rl.loss_norm);
3. update (jit, the Program's train_step, state donated): rl.num_epochs gradient steps on

       sum_t w_t [ -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta k3_t ]

   with rho_t = pi(o_t) / pi_old(o_t), k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 against
   the frozen reference (rl.kl_coef = beta; 0 builds none). The update batch is [B, G, ...]
   rows sharded over the data axes; one trainer step is one rollout batch.

Every log-prob (pi_old kept by the rollout, pi, ref) and the logged entropy are of
softmax(logits / rl.temperature), the distribution the rollout samples, as in TRL.

The learning-rate schedule counts optimizer updates: train.steps * rl.num_epochs of them.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.data.tasks import heldout_key
from jaxlm.losses.policy import clipped_surrogate, k3_kl, token_weights
from jaxlm.run.train_state import TrainState, lora_step_options
from jaxlm.stages.rl.advantages import group_advantages
from jaxlm.stages.rl.epochs import epoch_updates
from jaxlm.stages.rl.loop import RolloutLoop, eval_metrics, reward_metrics
from jaxlm.stages.rl.prompts import make_data
from jaxlm.stages.rl.rollout import flat_groups, rollout_programs, sequence_logps, sequences
from jaxlm.stages.rl.settings import RL
from jaxlm.stages.stage import BatchFields, Stage, example_eval_batches

Batch = dict[str, jax.Array]


def loss_fn(params: Any, batch: Batch, rng: jax.Array | None = None, *, model: nn.Module,
            clip_low: float, clip_high: float, kl_coef: float, total_rows: int,
            temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted clipped objective (+ KL) of [N, ...] rows, and sums for the metrics.
    num_tokens is the rows' share of the batch, so microbatches add up to a weight of 1.
    Log-probs and entropy are of softmax(logits / temperature), the rollout's."""
    num_new = batch["mask"].shape[-1]
    logp_NxT, entropy_NxT = sequence_logps(params, batch["tokens"], batch["valid"], num_new,
                                           model=model, with_entropy=True, rng=rng,
                                           temperature=temperature)
    per_token_NxT, clipped_NxT = clipped_surrogate(
        logp_NxT, batch["old_logps"], batch["advantages"][:, None], clip_low=clip_low,
        clip_high=clip_high)
    mask_NxT = batch["mask"]
    sums = {"clipped_sum": jnp.sum(clipped_NxT * mask_NxT),
            "entropy_sum": jnp.sum(entropy_NxT * mask_NxT), "mask_sum": jnp.sum(mask_NxT),
            "num_tokens": jnp.asarray(mask_NxT.shape[0] / total_rows, jnp.float32)}
    if "ref_logps" in batch:
        kl_NxT = k3_kl(logp_NxT, batch["ref_logps"])
        sums["kl_sum"] = jnp.sum(kl_NxT * mask_NxT)
        per_token_NxT = per_token_NxT + kl_coef * kl_NxT
    loss = jnp.sum(per_token_NxT * batch["weights"])
    return loss, {**sums, "loss_sum": loss}


def grpo_step(state: TrainState, batch: Batch, ref_params: Any = None, *, model: nn.Module,
              tx: optax.GradientTransformation, lr_schedule: optax.Schedule, clip_low: float,
              clip_high: float, kl_coef: float, num_epochs: int, temperature: float = 1.0,
              grad_accum_steps: int = 1, freeze: Any = None, dropout_seed: int | None = None
              ) -> tuple[TrainState, dict[str, jax.Array]]:
    """rl.num_epochs optimizer updates on one rollout batch [B, G, ...]; the state's step moves
    by one (a trainer step), the optimizer's count by num_epochs."""
    flat = flat_groups(batch)
    total = flat["tokens"].shape[0]
    if ref_params is not None:
        flat["ref_logps"] = jax.lax.stop_gradient(sequence_logps(
            ref_params, flat["tokens"], flat["valid"], flat["mask"].shape[-1], model=model,
            temperature=temperature))
    micro = functools.partial(loss_fn, model=model, clip_low=clip_low, clip_high=clip_high,
                              kl_coef=kl_coef, total_rows=total, temperature=temperature)
    step0 = state.step
    state, first, clipped, common = epoch_updates(
        state, flat, micro, num_epochs=num_epochs, tx=tx, lr_schedule=lr_schedule,
        grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed)
    n_tok = jnp.maximum(first["mask_sum"], 1.0)
    metrics = {**common, "lr": lr_schedule(step0 * num_epochs), "loss": first["loss_sum"],
               "entropy": first["entropy_sum"] / n_tok,
               "clip_fraction": clipped / (num_epochs * n_tok)}
    if "kl_sum" in first:
        metrics["kl"] = first["kl_sum"] / n_tok
    return state.replace(step=step0 + 1), metrics


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    r = config.rl
    train = functools.partial(
        grpo_step, model=model, tx=tx, lr_schedule=lr_schedule, clip_low=r.clip_eps,
        clip_high=r.clip_eps_high or r.clip_eps, kl_coef=r.kl_coef, num_epochs=r.num_epochs,
        temperature=r.temperature, grad_accum_steps=config.optim.grad_accum_steps,
        **lora_step_options(config))
    return train, None  # the loop evaluates by decoding held-out prompts


def batch_fields(config: Any) -> BatchFields:
    """One prompt's group per row: G sequences of data.seq_len tokens."""
    g, s, t = config.rl.group_size, config.data.seq_len, config.rl.max_new_tokens
    return {"tokens": ((g, s), np.int32), "valid": ((g, s), np.int32),
            "mask": ((g, t), np.float32), "old_logps": ((g, t), np.float32),
            "advantages": ((g,), np.float32), "weights": ((g, t), np.float32)}


def update_batch(rolled: dict[str, np.ndarray], rewards_BxG: np.ndarray, *, scale: str,
                 loss_norm: str) -> dict[str, np.ndarray]:
    """The update step's [B, G, ...] arrays from a rollout and its rewards."""
    seqs = sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                     rolled["lengths"])
    b, g, t = seqs["mask"].shape
    weights = np.asarray(token_weights(seqs["mask"].reshape(b * g, t), loss_norm))
    adv = np.asarray(group_advantages(rewards_BxG.astype(np.float32), scale))
    return {**seqs, "old_logps": rolled["logps"].astype(np.float32),
            "advantages": adv.astype(np.float32),
            "weights": weights.reshape(b, g, t).astype(np.float32)}


class GrpoLoop(RolloutLoop):
    """The GRPO step as the trainer calls it: rollout, rewards, advantages, update."""

    def train(self, state: TrainState, host_batch: dict[str, np.ndarray]
              ) -> tuple[TrainState, dict[str, float]]:
        r = self.config.rl
        t0 = time.perf_counter()
        rolled, rewards, parts = self.train_rollout(state, host_batch)
        arrays = update_batch(rolled, rewards, scale=r.advantage_scale, loss_norm=r.loss_norm)
        state, metrics = self.update(state, arrays)
        metrics.update(reward_metrics(rewards, parts, rolled["lengths"]))
        metrics.update(self.rollout_metrics(rolled, time.perf_counter() - t0))
        return state, metrics


def reference_mode(config: Any) -> str:
    return "jit" if config.rl.kl_coef > 0 else "none"


STAGE = Stage(name="grpo", make_steps=make_steps, make_data=make_data, batch_fields=batch_fields,
              sections=(RL,), eval_metrics=eval_metrics, reference_mode=reference_mode,
              make_programs=rollout_programs, make_loop=GrpoLoop,
              generates_text=False,  # samples are logged by the loop at each evaluation
              updates_per_step=lambda config: config.rl.num_epochs,
              sequences_per_row=lambda config: config.rl.group_size,
              eval_batches=example_eval_batches, heldout_key=heldout_key,
              eval_at_start=True)
