"""Rejection sampling (expert iteration, RAFT): sample, keep the best, fine-tune on it; repeat.

One step (`RejectionHost.train`): rl.group_size completions of each prompt from the current
policy (the KV-cache decoder on the training mesh), scored by the configured rewards (or by a
frozen reward-stage model, rl.reward_model); the
best-scoring completion of each prompt is kept when its reward reaches rl.keep_min_reward; one
optimizer step of the SFT loss (mean negative log-likelihood of the kept completions' tokens,
EOS included) follows. Each step samples from the policy the previous steps trained, so the
run iterates collect -> filter -> fine-tune with a fresh batch of prompts every round.
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

from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options
from jaxlm.stages.grpo import reward_metrics
from jaxlm.stages.rl.host import RolloutHost, eval_metrics
from jaxlm.stages.rl.prompts import make_prompt_iterator
from jaxlm.stages.rl.reward_model import RewardModel
from jaxlm.stages.rl.rollout import sequence_logps, sequences
from jaxlm.stages.rl.settings import check_rl, default_rl_config
from jaxlm.stages.stage import BatchFields, Stage

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
    """One SFT step on the kept completions of a batch (no update when none is kept)."""
    new_state, sums, common = gradient_step(
        state, batch, functools.partial(loss_fn, model=model), tx=tx, lr_schedule=lr_schedule,
        grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed)
    n = jnp.maximum(sums["num_tokens"], 1.0)
    return new_state, {**common, "loss": sums["nll_sum"] / n, "kept_tokens": sums["num_tokens"]}


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Summed NLL of a batch's kept completions (the held-out evaluation decodes on the host)."""
    _, sums = loss_fn(params, batch, model=model)
    return sums


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    train = functools.partial(rejection_step, model=model, tx=tx, lr_schedule=lr_schedule,
                              grad_accum_steps=config.optim.grad_accum_steps,
                              **lora_step_options(config))
    return train, functools.partial(eval_step, model=model)


def batch_fields(config: Any) -> BatchFields:
    """One prompt's kept completion per row."""
    s, t = config.data.seq_len, config.rl.max_new_tokens
    return {"tokens": ((s,), np.int32), "valid": ((s,), np.int32), "mask": ((t,), np.float32),
            "keep": ((), np.float32)}


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str) -> Any:
    del cache_dir
    return make_prompt_iterator(config, tokenizer, split=split, batch_size=batch_size,
                                process_index=process_index, process_count=process_count)


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


class RejectionHost(RolloutHost):
    """The rejection-sampling step as the trainer calls it: sample, filter, fine-tune. The
    ranking reward is rl.rewards, or the score of rl.reward_model when set (`reward_params`:
    that model's params, default restored)."""

    def __init__(self, program: Any, tokenizer: Any, reward_params: Any = None):
        super().__init__(program, tokenizer)
        path = self.config.rl.reward_model
        self.reward_model = (RewardModel(program, path, params=reward_params, tokenizer=tokenizer)
                             if path or reward_params is not None else None)

    def train(self, state: TrainState, host_batch: dict[str, np.ndarray], reference: Any = None
              ) -> tuple[TrainState, dict[str, float]]:
        del reference
        r = self.config.rl
        t0 = time.perf_counter()
        rolled, rewards, parts = self.train_rollout(state, host_batch)
        if self.reward_model is not None:
            rewards = self.reward_model.score(
                sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                          rolled["lengths"]), rolled["lengths"])
        arrays = best_of_group(rolled, rewards, r.keep_min_reward)
        t1 = time.perf_counter()
        state, metrics = self.update(state, arrays)
        t2 = time.perf_counter()
        metrics.update(reward_metrics(rewards, parts, rolled["lengths"]))
        metrics["best_reward_mean"] = float(rewards.max(axis=1).mean())
        metrics["kept_fraction"] = float(arrays["keep"].mean())
        metrics.update(self.throughput(rolled, len(arrays["keep"]), 1.0, rolled["seconds"],
                                       t2 - t1, t2 - t0))
        return state, metrics


STAGE = Stage(name="rejection", make_steps=make_steps, make_data=make_data,
              batch_fields=batch_fields, section="rl", default_section=default_rl_config,
              check_config=check_rl, eval_metrics=eval_metrics, generates_text=False,
              make_host=RejectionHost)
