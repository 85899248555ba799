"""Reward model: the transformer with a scalar head, trained on preference pairs.

The model is built with `reward_head=True` (config.stage == "reward"), so it returns a score per
position; a sequence's reward is the score at its last input token (the pair rows are in
next-token layout, so that is the answer's last token before its closing marker).
The batch is the DPO pair layout ([B, 2, L], chosen then rejected, jaxlm/data/preference.py).
Bradley-Terry loss with an optional margin m: -log sigmoid(r_chosen - r_rejected - m), averaged
over pairs. Metrics: loss, accuracy (share of pairs with r_chosen > r_rejected), mean margin
r_chosen - r_rejected, mean chosen and rejected rewards. Start it from an SFT or pretraining
checkpoint (init_from); the head starts at zero, so the loss starts at log 2 (+ margin).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.train_state import TrainState, microbatched_grads

Batch = dict[str, jax.Array]
_FIELDS = ("inputs", "segment_ids", "positions")


def sequence_rewards(params: Any, batch: Batch, *, model: nn.Module) -> jax.Array:
    """[B, 2] rewards: the score at the last non-padding token of each sequence."""
    b, two, length = batch["inputs"].shape
    flat = {k: batch[k].reshape(b * two, length) for k in _FIELDS}
    scores_NxL = model.apply({"params": params}, flat["inputs"], positions_BxL=flat["positions"],
                             segment_ids_BxL=flat["segment_ids"])
    last_N = jnp.maximum(jnp.sum(flat["segment_ids"] > 0, axis=-1) - 1, 0)
    return jnp.take_along_axis(scores_NxL, last_N[:, None], axis=-1)[:, 0].reshape(b, two)


def bradley_terry(rewards_Bx2: jax.Array, margin: float = 0.0) -> jax.Array:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin)."""
    return -jax.nn.log_sigmoid(rewards_Bx2[:, 0] - rewards_Bx2[:, 1] - margin)


def loss_fn(params: Any, batch: Batch, *, model: nn.Module, margin: float
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed loss over the pairs, and sums for the metrics (num_tokens = pairs)."""
    rewards_Bx2 = sequence_rewards(params, batch, model=model)
    loss_B = bradley_terry(rewards_Bx2, margin)
    diff_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    n = jnp.asarray(loss_B.shape[0], jnp.float32)
    sums = {"loss_sum": jnp.sum(loss_B), "correct": jnp.sum((diff_B > 0).astype(jnp.float32)),
            "margin_sum": jnp.sum(diff_B), "chosen_sum": jnp.sum(rewards_Bx2[:, 0]),
            "rejected_sum": jnp.sum(rewards_Bx2[:, 1]), "num_pairs": n}
    return sums["loss_sum"], {**sums, "num_tokens": n}


def means(sums: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    n = jnp.maximum(sums["num_pairs"], 1.0)
    return {f"{prefix}loss": sums["loss_sum"] / n, f"{prefix}accuracy": sums["correct"] / n,
            f"{prefix}margin": sums["margin_sum"] / n,
            f"{prefix}chosen_reward": sums["chosen_sum"] / n,
            f"{prefix}rejected_reward": sums["rejected_sum"] / n}


def reward_step(state: TrainState, batch: Batch, *, model: nn.Module,
                tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                margin: float = 0.0, num_microbatches: int = 1
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean Bradley-Terry loss over the pairs of `batch`."""
    grads, sums = microbatched_grads(
        lambda p, b: loss_fn(p, b, model=model, margin=margin), state.params, batch,
        num_microbatches)
    metrics = means(sums)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads, tx, finite=finite)
    metrics.update(grad_norm=grad_norm, param_norm=optax.global_norm(state.params),
                   lr=lr_schedule(state.step), num_pairs=sums["num_pairs"],
                   nonfinite=new_state.nonfinite)
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, margin: float = 0.0
              ) -> dict[str, jax.Array]:
    _, sums = loss_fn(params, batch, model=model, margin=margin)
    sums.pop("num_tokens")
    return sums


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in means(totals, prefix="eval_").items()}


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    margin = config.reward.margin
    train = functools.partial(reward_step, model=model, tx=tx, lr_schedule=lr_schedule,
                              margin=margin, num_microbatches=config.optim.grad_accum_steps)
    return train, functools.partial(eval_step, model=model, margin=margin)


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str) -> Any:
    """Pair batches (jaxlm/data/preference.py) from the reward.* section."""
    del cache_dir
    from jaxlm.data.preference import make_pair_iterator
    return make_pair_iterator(config, tokenizer, split=split, batch_size=batch_size,
                              process_index=process_index, process_count=process_count,
                              section="reward")
