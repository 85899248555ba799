"""PPO from a reward model (RLHF): a value head on the policy trunk, GAE, clipped policy and
value losses, the reward model's score plus a per-token KL penalty as the reward.

The value function is a second head on the policy's own trunk (the model is built with
`reward_head=True`: its `reward_head` vector, zero at the start, reads the final hidden state),
trained with the policy in one objective. Sharing the trunk costs no second model's memory,
optimizer state or forward pass, and the value sees exactly the features the policy acts on;
`ppo.value_coef` bounds how much the value loss moves the shared weights.

One step (`PpoLoop.train`, the stage's `StepLoop`): G completions per prompt from the
Program's rollout (pi_old per token kept); the frozen reward model (a reward-stage checkpoint,
`rl.reward_model`, sharded like the policy) scores each completion at its last token with the
Program's "reward_score" program; then the jitted update computes, with the frozen reference
(init_from) and the rollout policy's values V,

    r_t = -beta (log pi_old(o_t) - log ref(o_t))  (+ score at the last token)
    A = GAE(r, V; ppo.gamma, ppo.lam), R = A + V, A whitened over the batch (ppo.whiten)

and takes rl.num_epochs steps on the clipped policy loss plus ppo.value_coef times the clipped
value loss 0.5 max((V' - R)^2, (V + clip(V' - V, +-ppo.value_clip) - R)^2), token weights as
rl.loss_norm. beta is rl.kl_coef, fixed or (ppo.kl_target > 0) adapted on the host after
each step; an adapted beta is saved with every checkpoint (`PpoLoop.host_state`), so a resumed
run continues from the beta the uninterrupted one would use.

ppo.score_transform="sigmoid" turns each score into sigmoid(score) and
ppo.score_baseline="group_mean" then takes from it the mean of its prompt's rl.group_size
completions; the first ppo.value_warmup_steps steps train the value head alone;
ppo.value_lr_scale multiplies the value head's learning rate. The held-out evaluation adds the
reward model's mean score of the greedy completions (eval_score_mean) to the task's metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.data.tasks import heldout_key
from jaxlm.losses.cross_entropy import token_logps
from jaxlm.losses.policy import clipped_surrogate, token_weights
from jaxlm.models import Transformer
from jaxlm.run.train_state import TrainState, lora_step_options
from jaxlm.stages.rl.advantages import gae, group_advantages, whiten
from jaxlm.stages.rl.epochs import epoch_updates
from jaxlm.stages.rl.loop import RolloutLoop, eval_metrics
from jaxlm.stages.rl.prompts import make_data
from jaxlm.stages.rl.reward_model import SCORE, RewardModel, score_program
from jaxlm.stages.rl.rollout import (
    completion_hidden,
    flat_groups,
    rollout_programs,
    sequence_logps,
    sequences,
)
from jaxlm.stages.rl.settings import PPO, RL
from jaxlm.stages.stage import BatchFields, JitProgram, Stage, example_eval_batches

Batch = dict[str, jax.Array]


def language_model(model: nn.Module) -> nn.Module:
    """The same params read through the vocab head (the value head stays unused)."""
    return Transformer(dataclasses.replace(model.cfg, reward_head=False))


def logps_values(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array, num_new: int, *,
                 lm: nn.Module, rng: jax.Array | None = None, temperature: float = 1.0
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token log-probs and entropies of softmax(logits / temperature), and values [N, T]
    of the completion slots, one pass."""
    hidden_NxTxD, head_VxD = completion_hidden(params, tokens_NxS, valid_NxS, num_new, model=lm,
                                               rng=rng)
    logp, entropy = token_logps(hidden_NxTxD, head_VxD, tokens_NxS[:, -num_new:],
                                vocab_size=lm.cfg.vocab_size, with_entropy=True,
                                logit_softcap=lm.cfg.final_logit_softcap,
                                temperature=temperature)
    w_D = params["reward_head"].astype(hidden_NxTxD.dtype)
    values = jnp.einsum("ntd,d->nt", hidden_NxTxD, w_D).astype(jnp.float32)
    return logp, entropy, values


def token_rewards(score_N: jax.Array, old_logp_NxT: jax.Array, ref_logp_NxT: jax.Array,
                  mask_NxT: jax.Array, kl_coef_N: jax.Array) -> jax.Array:
    """-kl_coef (log pi_old - log ref) on every generated token, plus the score on the last."""
    lengths_N = mask_NxT.sum(axis=1).astype(jnp.int32)
    last_NxT = jax.nn.one_hot(lengths_N - 1, mask_NxT.shape[1]) * (lengths_N > 0)[:, None]
    kl_NxT = (old_logp_NxT - ref_logp_NxT) * mask_NxT
    return -kl_coef_N[:, None] * kl_NxT + score_N[:, None] * last_NxT


def clipped_value_loss(values_NxT: jax.Array, old_values_NxT: jax.Array,
                       returns_NxT: jax.Array, clip: float) -> jax.Array:
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2) per token."""
    clipped = old_values_NxT + jnp.clip(values_NxT - old_values_NxT, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(values_NxT - returns_NxT),
                             jnp.square(clipped - returns_NxT))


def score_reward(score_BxG: np.ndarray, *, transform: str, baseline: str) -> np.ndarray:
    """The reward-model scores of a step's completions [B, G] as their rewards:
    sigmoid(score) or the score (ppo.score_transform), minus the prompt's mean of that or not
    (ppo.score_baseline)."""
    reward = np.exp(-np.logaddexp(0.0, -score_BxG)) if transform == "sigmoid" else score_BxG
    if baseline == "group_mean":
        reward = np.asarray(group_advantages(reward, scale="none"))
    return reward.astype(np.float32)


def adaptive_kl(coef: float, kl: float, *, target: float, horizon: int, batch: int) -> float:
    """Ziegler et al. (2019): coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon)."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return coef * (1.0 + error * batch / horizon)


def value_head_mask(params: Any) -> Any:
    """True on the value head's leaves (the trunk's `reward_head`), False elsewhere."""
    return {k: jax.tree.map(lambda _, k=k: k == "reward_head", v) for k, v in params.items()}


def value_only(params: Any, policy_on: jax.Array) -> Any:
    """The same params, gradients stopped everywhere but the value head unless policy_on."""
    def gate(x: jax.Array) -> jax.Array:
        return jnp.where(policy_on, x, jax.lax.stop_gradient(x))

    return {k: v if k == "reward_head" else jax.tree.map(gate, v) for k, v in params.items()}


def wrap_optimizer(config: Any, tx: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
    """The run's optimizer with the value head's updates times ppo.value_lr_scale."""
    scale = config.ppo.value_lr_scale
    if scale == 1.0:
        return tx
    return optax.chain(tx, optax.masked(optax.scale(scale), value_head_mask))


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 for a perfect value function, 0 for
    one no better than the mean return, negative for worse."""
    n = jnp.maximum(jnp.sum(mask), 1.0)

    def var(x: jax.Array) -> jax.Array:
        mean = jnp.sum(x * mask) / n
        return jnp.sum(jnp.square(x - mean) * mask) / n

    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def loss_fn(params: Any, batch: Batch, rng: jax.Array | None = None, *, lm: nn.Module,
            clip_low: float, clip_high: float, value_clip: float, value_coef: float,
            total_rows: int, temperature: float = 1.0, policy_on: jax.Array | bool = True
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped policy loss plus value_coef times the clipped value loss, summed with the
    batch's token weights. policy_on False (a traced bool): the value loss alone, with only the
    value head's gradient (ppo.value_warmup_steps)."""
    num_new = batch["mask"].shape[-1]
    if policy_on is not True:
        params = value_only(params, policy_on)
    logp, entropy, values = logps_values(params, batch["tokens"], batch["valid"], num_new,
                                         lm=lm, rng=rng, temperature=temperature)
    pg_NxT, clipped_NxT = clipped_surrogate(logp, batch["old_logps"], batch["adv"],
                                            clip_low=clip_low, clip_high=clip_high)
    vf_NxT = clipped_value_loss(values, batch["old_values"], batch["returns"], value_clip)
    mask, w = batch["mask"], batch["weights"]
    pg_weight = jnp.asarray(policy_on, jnp.float32)
    loss = jnp.sum((pg_weight * pg_NxT + value_coef * vf_NxT) * w)
    return loss, {"loss_sum": loss, "value_loss_sum": jnp.sum(vf_NxT * w),
                  "clipped_sum": jnp.sum(clipped_NxT * mask),
                  "entropy_sum": jnp.sum(entropy * mask), "mask_sum": jnp.sum(mask),
                  "num_tokens": jnp.asarray(mask.shape[0] / total_rows, jnp.float32)}


def ppo_step(state: TrainState, batch: Batch, ref_params: Any, *, model: nn.Module,
             tx: optax.GradientTransformation, lr_schedule: optax.Schedule, clip_low: float,
             clip_high: float, value_clip: float, value_coef: float, gamma: float, lam: float,
             whiten_advantages: bool, num_epochs: int, temperature: float = 1.0,
             value_warmup_steps: int = 0, grad_accum_steps: int = 1, freeze: Any = None,
             dropout_seed: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """Rewards, GAE and rl.num_epochs updates on one rollout batch [B, G, ...]; every
    log-prob (pi_old, pi, ref: the ratio and the KL reward) is of softmax(logits / T), the
    rollout's sampling distribution. The first value_warmup_steps steps update the value head
    alone."""
    lm = language_model(model)
    flat = flat_groups(batch)
    num_new, total = flat["mask"].shape[-1], flat["mask"].shape[0]
    mask = flat["mask"]
    ref = sequence_logps(ref_params, flat["tokens"], flat["valid"], num_new, model=lm,
                         temperature=temperature)
    _, _, old_values = logps_values(state.params, flat["tokens"], flat["valid"], num_new, lm=lm)
    ref, old_values = jax.lax.stop_gradient(ref), jax.lax.stop_gradient(old_values * mask)
    rewards = token_rewards(flat["score"], flat["old_logps"], ref, mask, flat["kl_coef"])
    adv, returns = gae(rewards, old_values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv = whiten(adv, mask)
    flat.update(adv=adv, returns=returns, old_values=old_values)
    micro = functools.partial(loss_fn, lm=lm, clip_low=clip_low, clip_high=clip_high,
                              value_clip=value_clip, value_coef=value_coef, total_rows=total,
                              temperature=temperature,
                              policy_on=state.step >= value_warmup_steps
                              if value_warmup_steps else True)
    step0 = state.step
    state, first, clipped, common = epoch_updates(
        state, flat, micro, num_epochs=num_epochs, tx=tx, lr_schedule=lr_schedule,
        grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed)
    n_tok = jnp.maximum(jnp.sum(mask), 1.0)
    kl_N = jnp.sum((flat["old_logps"] - ref) * mask, axis=1)
    metrics = {**common, "lr": lr_schedule(step0 * num_epochs), "loss": first["loss_sum"],
               "value_loss": first["value_loss_sum"], "entropy": first["entropy_sum"] / n_tok,
               "clip_fraction": clipped / (num_epochs * n_tok),
               "kl": jnp.sum((flat["old_logps"] - ref) * mask) / n_tok,
               "sequence_kl": jnp.mean(kl_N), "value_mean": jnp.sum(old_values) / n_tok,
               "return_mean": jnp.sum(returns * mask) / n_tok,
               "value_explained_variance": explained_variance(old_values, returns, mask)}
    return state.replace(step=step0 + 1), metrics


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    r, p = config.rl, config.ppo
    train = functools.partial(
        ppo_step, model=model, tx=tx, lr_schedule=lr_schedule, clip_low=r.clip_eps,
        clip_high=r.clip_eps_high or r.clip_eps, value_clip=p.value_clip,
        value_coef=p.value_coef, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten,
        num_epochs=r.num_epochs, temperature=r.temperature,
        value_warmup_steps=p.value_warmup_steps,
        grad_accum_steps=config.optim.grad_accum_steps,
        **lora_step_options(config))
    return train, None  # the loop evaluates by decoding held-out prompts


def batch_fields(config: Any) -> BatchFields:
    g, s, t = config.rl.group_size, config.data.seq_len, config.rl.max_new_tokens
    return {"tokens": ((g, s), np.int32), "valid": ((g, s), np.int32),
            "mask": ((g, t), np.float32), "old_logps": ((g, t), np.float32),
            "weights": ((g, t), np.float32), "score": ((g,), np.float32),
            "kl_coef": ((g,), np.float32)}


def make_programs(program: Any) -> dict[str, JitProgram]:
    """The rollouts and the reward model's scoring."""
    return {**rollout_programs(program), SCORE: score_program(program)}


class PpoLoop(RolloutLoop):
    """The PPO step as the trainer calls it: rollout, reward-model scores, update, KL control.
    `reward_params`: the reward model's params (default: restored from rl.reward_model)."""

    def __init__(self, program: Any, tokenizer: Any, step_args: tuple[Any, ...] = (),
                 reward_params: Any = None):
        super().__init__(program, tokenizer, step_args)
        r = self.config.rl
        self.reward_model = RewardModel(
            program, r.reward_model, None if r.reward_model_step < 0 else r.reward_model_step,
            params=reward_params, tokenizer=tokenizer)
        self.kl_coef = float(r.kl_coef)

    def host_state(self) -> dict[str, Any]:
        """The beta of the next step (after the last step's adaptive update)."""
        return {"kl_coef": self.kl_coef}

    def load_host_state(self, state: dict[str, Any]) -> None:
        """An adaptive beta continues from the checkpoint's; a fixed one is rl.kl_coef."""
        if self.config.ppo.kl_target > 0 and "kl_coef" in state:
            self.kl_coef = float(state["kl_coef"])

    def train(self, state: TrainState, host_batch: dict[str, np.ndarray]
              ) -> tuple[TrainState, dict[str, float]]:
        r, p = self.config.rl, self.config.ppo
        t0 = time.perf_counter()
        rolled, task_rewards, parts = self.train_rollout(state, host_batch)
        seqs = sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                         rolled["lengths"])
        b, g, t = seqs["mask"].shape
        score = self.reward_model.score(seqs, rolled["lengths"])
        reward = score_reward(score, transform=p.score_transform, baseline=p.score_baseline)
        weights = np.asarray(token_weights(seqs["mask"].reshape(b * g, t), r.loss_norm))
        arrays = {**seqs, "old_logps": rolled["logps"].astype(np.float32),
                  "weights": weights.reshape(b, g, t).astype(np.float32),
                  "score": reward.astype(np.float32),
                  "kl_coef": np.full((b, g), self.kl_coef, np.float32)}
        state, metrics = self.update(state, arrays)
        metrics.update({"reward_mean": float(score.mean()), "reward_std": float(score.std()),
                        # the spread among one prompt's completions (reward_std: the batch's)
                        "reward_group_std": float(score.std(axis=1).mean()),
                        "task_reward_mean": float(task_rewards.mean()),
                        **{f"reward_{k}": float(v.mean()) for k, v in parts.items()},
                        "response_length": float(rolled["lengths"].mean()),
                        "kl_coef": self.kl_coef})
        if p.kl_target > 0:
            self.kl_coef = adaptive_kl(self.kl_coef, metrics["sequence_kl"], target=p.kl_target,
                                       horizon=p.kl_horizon, batch=b * g)
        metrics.update(self.rollout_metrics(rolled, time.perf_counter() - t0))
        return state, metrics

    def eval(self, params: Any, host_batch: dict[str, np.ndarray]) -> dict[str, float]:
        """The greedy held-out completions' task sums (`RolloutLoop.eval`) and the reward
        model's summed score of them (eval_score_mean)."""
        rolled, sums = self.eval_rollout(params, host_batch)
        seqs = sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                         rolled["lengths"])
        sums["score_sum"] = float(self.reward_model.score(seqs, rolled["lengths"]).sum())
        return sums


def ppo_eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The RL held-out metrics (`eval_metrics`) and eval_score_mean: the reward model's mean
    score of the greedy held-out completions."""
    n = max(totals.get("count", 0.0), 1.0)
    return {**eval_metrics(totals), "eval_score_mean": totals.get("score_sum", 0.0) / n}


STAGE = Stage(name="ppo", make_steps=make_steps, make_data=make_data, batch_fields=batch_fields,
              sections=(RL, PPO), reward_head=True, eval_metrics=ppo_eval_metrics,
              reference_mode=lambda config: "jit", generates_text=False,
              make_programs=make_programs, make_loop=PpoLoop,
              updates_per_step=lambda config: config.rl.num_epochs,
              # The rollout policy's values, before the epochs.
              policy_forwards=lambda config: 1,
              sequences_per_row=lambda config: config.rl.group_size,
              eval_batches=example_eval_batches, heldout_key=heldout_key,
              eval_at_start=True, wrap_optimizer=wrap_optimizer)
