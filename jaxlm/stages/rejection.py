"""Rejection sampling (expert iteration, RAFT): sample, keep the best, fine-tune on it; repeat.

One step (`RejectionLoop.train`, the stage's `StepLoop`): rl.group_size completions of each
prompt from the current policy (the Program's rollout: the KV-cache decoder on the training
mesh), scored by the configured rewards (or by a frozen reward-stage model, rl.reward_model,
through the Program's "reward_score" program); the best-scoring completion of each prompt is
kept when its reward reaches rl.keep_min_reward; one optimizer step of the SFT loss (mean
negative log-likelihood of the kept completions' tokens, EOS included) follows. Each step
samples from the policy the previous steps trained, so the run iterates collect -> filter ->
fine-tune with a fresh batch of prompts every round. A step that keeps nothing takes no
optimizer update (AdamW's momentum and weight decay would move the weights without a
sample): the trainer's step counts, the params, the optimizer state and its update count (so
the learning-rate schedule) stay, and its metrics log `updated` 0.
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
from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options, update_count
from jaxlm.stages.rl.loop import RolloutLoop, eval_metrics, reward_metrics
from jaxlm.stages.rl.prompts import make_data
from jaxlm.stages.rl.reward_model import SCORE, RewardModel, score_program
from jaxlm.stages.rl.rollout import rollout_programs, sequence_logps, sequences
from jaxlm.stages.rl.settings import RL
from jaxlm.stages.stage import BatchFields, JitProgram, Stage, example_eval_batches

Batch = dict[str, jax.Array]


def loss_fn(params: Any, batch: Batch, rng: jax.Array | None = None, *, model: nn.Module
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed NLL of the kept rows' completion tokens; num_tokens counts them."""
    mask_BxT = batch["mask"] * batch["keep"][:, None]
    logp_BxT = sequence_logps(params, batch["tokens"], batch["valid"], mask_BxT.shape[-1],
                              model=model, rng=rng)
    nll = -jnp.sum(logp_BxT * mask_BxT)
    return nll, {"nll_sum": nll, "num_tokens": jnp.sum(mask_BxT)}


def rejection_step(state: TrainState, batch: Batch, *, model: nn.Module,
                   tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                   grad_accum_steps: int = 1, freeze: Any = None,
                   dropout_seed: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SFT step on the kept completions of a batch; none kept: no optimizer update.
    `lr` is the rate of this step's update (for a skipped one: of the next update)."""
    kept = jnp.sum(batch["keep"]) > 0
    new_state, sums, common = gradient_step(
        state, batch, functools.partial(loss_fn, model=model), tx=tx, lr_schedule=lr_schedule,
        grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed,
        update=kept)
    n = jnp.maximum(sums["num_tokens"], 1.0)
    return new_state, {**common, "lr": lr_schedule(update_count(state.opt_state, state.step)),
                       "loss": sums["nll_sum"] / n, "kept_tokens": sums["num_tokens"],
                       "updated": kept.astype(jnp.float32)}


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    train = functools.partial(rejection_step, model=model, tx=tx, lr_schedule=lr_schedule,
                              grad_accum_steps=config.optim.grad_accum_steps,
                              **lora_step_options(config))
    return train, None  # the loop evaluates by decoding held-out prompts


def batch_fields(config: Any) -> BatchFields:
    """One prompt's kept completion per row."""
    s, t = config.data.seq_len, config.rl.max_new_tokens
    return {"tokens": ((s,), np.int32), "valid": ((s,), np.int32), "mask": ((t,), np.float32),
            "keep": ((), np.float32)}


def make_programs(program: Any) -> dict[str, JitProgram]:
    """The rollouts, and the reward model's scoring when rl.reward_model ranks completions."""
    scorer = {SCORE: score_program(program)} if program.config.rl.reward_model else {}
    return {**rollout_programs(program), **scorer}


def best_of_group(rolled: dict[str, np.ndarray], rewards_BxG: np.ndarray, min_reward: float
                  ) -> dict[str, np.ndarray]:
    """Each prompt's highest-reward completion (the first of ties) as one [B, ...] row, and
    keep = 1 where that reward is >= min_reward."""
    best_B = np.argmax(rewards_BxG, axis=1)
    rows = np.arange(len(best_B))
    seqs = sequences(rolled["prompt"], rolled["prompt_valid"],
                     rolled["completion"][rows, best_B][:, None],
                     rolled["lengths"][rows, best_B][:, None])
    keep = (rewards_BxG[rows, best_B] >= min_reward).astype(np.float32)
    return {**{k: v[:, 0] for k, v in seqs.items()}, "keep": keep}


class RejectionLoop(RolloutLoop):
    """The rejection-sampling step as the trainer calls it: sample, filter, fine-tune. The
    ranking reward is rl.rewards, or the score of rl.reward_model when set (`reward_params`:
    that model's params, default restored)."""

    def __init__(self, program: Any, tokenizer: Any, step_args: tuple[Any, ...] = (),
                 reward_params: Any = None):
        super().__init__(program, tokenizer, step_args)
        r = self.config.rl
        self.reward_model = (RewardModel(
            program, r.reward_model, None if r.reward_model_step < 0 else r.reward_model_step,
            params=reward_params, tokenizer=tokenizer) if SCORE in program.programs else None)

    def train(self, state: TrainState, host_batch: dict[str, np.ndarray]
              ) -> tuple[TrainState, dict[str, float]]:
        r = self.config.rl
        t0 = time.perf_counter()
        rolled, rewards, parts = self.train_rollout(state, host_batch)
        if self.reward_model is not None:
            rewards = self.reward_model.score(
                sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                          rolled["lengths"]), rolled["lengths"])
        arrays = best_of_group(rolled, rewards, r.keep_min_reward)
        state, metrics = self.update(state, arrays)
        metrics.update(reward_metrics(rewards, parts, rolled["lengths"]))
        metrics["best_reward_mean"] = float(rewards.max(axis=1).mean())
        metrics["kept_fraction"] = float(arrays["keep"].mean())
        metrics.update(self.rollout_metrics(rolled, time.perf_counter() - t0))
        return state, metrics


STAGE = Stage(name="rejection", make_steps=make_steps, make_data=make_data,
              batch_fields=batch_fields, sections=(RL,), eval_metrics=eval_metrics,
              generates_text=False, make_programs=make_programs, make_loop=RejectionLoop,
              eval_batches=example_eval_batches, heldout_key=heldout_key,
              eval_at_start=True)
