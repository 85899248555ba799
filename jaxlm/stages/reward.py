"""Reward model: the transformer with a scalar head, trained on preference pairs.

The model is built with `reward_head=True` (config.stage == "reward"), so it returns a score per
position; a sequence's reward is the score at its last real token. The rows hold whole
sequences (jaxlm/data/preference.py, `whole=True`): prompt, answer and the answer's closing
marker, so the score is read at that marker, where an RL rollout that stops at the marker is
read too (`jaxlm.stages.rl.reward_model`; TRL appends EOS and reads the last token in both).
The batch is the DPO pair fields ([B, 2, L], chosen then rejected).
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

from jaxlm.models.moe import add_router_losses, router_metrics
from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options
from jaxlm.stages import pairs
from jaxlm.stages.settings import REWARD
from jaxlm.stages.stage import Stage, example_eval_batches, section_heldout_key

Batch = dict[str, jax.Array]
_FIELDS = ("inputs", "segment_ids", "positions")


def sequence_rewards(params: Any, batch: Batch, *, model: nn.Module,
                     rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """[B, 2] rewards (the score at the last non-padding token of each sequence), and the
    model's sown intermediates (MoE router stats). `rng` feeds dropout (LoRA) in training."""
    b, two = batch["inputs"].shape[:2]
    flat = pairs.flatten(batch, _FIELDS)
    scores_NxL, variables = pairs.apply(params, flat, model=model, rng=rng)
    last_N = jnp.maximum(jnp.sum(flat["segment_ids"] > 0, axis=-1) - 1, 0)
    rewards_Bx2 = jnp.take_along_axis(scores_NxL, last_N[:, None], axis=-1)[:, 0].reshape(b, two)
    return rewards_Bx2, variables


def bradley_terry(rewards_Bx2: jax.Array, margin: float = 0.0) -> jax.Array:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin)."""
    return -jax.nn.log_sigmoid(rewards_Bx2[:, 0] - rewards_Bx2[:, 1] - margin)


def loss_fn(params: Any, batch: Batch, *, model: nn.Module, margin: float,
            rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed loss over the pairs, and sums for the metrics (num_tokens = pairs); a
    mixture-of-experts model's router losses are added per pair (`add_router_losses`).
    Rows without tokens (the empty rows that fill the last eval batch) count for nothing."""
    rewards_Bx2, variables = sequence_rewards(params, batch, model=model, rng=rng)
    loss_B = bradley_terry(rewards_Bx2, margin)
    diff_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    v_B = (batch["segment_ids"] > 0).any(axis=-1).all(axis=-1).astype(jnp.float32)
    sums = {"loss_sum": jnp.sum(loss_B * v_B), "correct": jnp.sum((diff_B > 0) * v_B),
            "margin_sum": jnp.sum(diff_B * v_B), "chosen_sum": jnp.sum(rewards_Bx2[:, 0] * v_B),
            "rejected_sum": jnp.sum(rewards_Bx2[:, 1] * v_B), "num_pairs": jnp.sum(v_B)}
    return add_router_losses(sums["loss_sum"], {**sums, "num_tokens": sums["num_pairs"]},
                             variables, model.cfg)


def means(sums: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    n = jnp.maximum(sums["num_pairs"], 1.0)
    return {f"{prefix}loss": sums["loss_sum"] / n, f"{prefix}accuracy": sums["correct"] / n,
            f"{prefix}margin": sums["margin_sum"] / n,
            f"{prefix}chosen_reward": sums["chosen_sum"] / n,
            f"{prefix}rejected_reward": sums["rejected_sum"] / n}


def reward_step(state: TrainState, batch: Batch, *, model: nn.Module, margin: float = 0.0,
                **step_options: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean Bradley-Terry loss over the pairs of `batch`.
    `step_options`: `gradient_step`'s (tx, lr_schedule, grad_accum_steps, freeze,
    dropout_seed)."""
    new_state, sums, common = gradient_step(
        state, batch, lambda p, b, rng: loss_fn(p, b, model=model, margin=margin, rng=rng),
        **step_options)
    n = jnp.maximum(sums["num_pairs"], 1.0)
    metrics = {**means(sums), **common, "num_pairs": sums["num_pairs"],
               **router_metrics(sums, n)}
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, margin: float = 0.0
              ) -> dict[str, jax.Array]:
    _, sums = loss_fn(params, batch, model=model, margin=margin)
    return {k: v for k, v in sums.items() if k != "num_tokens" and not k.startswith("moe_")}


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in means(totals, prefix="eval_").items()}


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    margin = config.reward.margin
    train = functools.partial(reward_step, model=model, tx=tx, lr_schedule=lr_schedule,
                              margin=margin, grad_accum_steps=config.optim.grad_accum_steps,
                              **lora_step_options(config))
    return train, functools.partial(eval_step, model=model, margin=margin)


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str) -> Any:
    """Pair batches (jaxlm/data/preference.py) from the reward.* section."""
    del cache_dir
    from jaxlm.data.preference import make_pair_iterator
    return make_pair_iterator(config, tokenizer, split=split, batch_size=batch_size,
                              process_index=process_index, process_count=process_count,
                              section="reward")


STAGE = Stage(name="reward", make_steps=make_steps, make_data=make_data,
              batch_fields=pairs.batch_fields, sections=(REWARD,),
              heldout_key=section_heldout_key('reward'),
              sequences_per_row=pairs.SEQUENCES_PER_ROW, vocab_head=False, reward_head=True,
              eval_metrics=eval_metrics, generates_text=False,
              eval_batches=example_eval_batches)
