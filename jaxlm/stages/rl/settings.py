"""The `rl` and `ppo` config sections: defaults and checks, each key declared once.

`RL` holds what the RL stages share (task, rewards, sampling, the clipped objective, the KL
coefficient, the reward model) and is listed by grpo, rejection and ppo; `PPO` holds what only
PPO reads (value head, GAE, adaptive KL) and is listed by ppo alone. Importing this module pulls
in neither grain nor JAX.
"""

from __future__ import annotations

import ml_collections

from jaxlm.data.config import split_list
from jaxlm.run.errors import check_at_least, check_choice, check_interval, config_error
from jaxlm.run.section import Section

TASKS = ("arithmetic", "jsonl")
ADVANTAGE_SCALES = ("std", "sample_std", "none")
LOSS_NORMS = ("sequence", "token", "constant")


def default_rl_config() -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict()
    # Prompts and their checked answers: "arithmetic" (generated procedurally, no download) or
    # "jsonl" (rl.paths: one {"prompt": str, "answer": str} record a line).
    r.task = "arithmetic"
    # jsonl task: comma-separated globs; held-out prompts from rl.eval_paths, or (empty)
    # data.eval_fraction of rl.paths under a fixed permutation.
    r.paths = ""
    r.eval_paths = ""
    # arithmetic task: num_operands integers in [0, max_operand] joined by ops from this string
    # of "+-*", evaluated left to right ("3+4-2=" -> "5"). Every such problem is one example;
    # data.eval_fraction of them are held out.
    r.max_operand = 9
    r.operations = "+-"
    r.num_operands = 2
    # Share of the non-held-out problems set aside for supervised stages that read the task
    # (sft.paths / reward.paths / dpo.paths = "task"), never RL prompts (jaxlm/data/tasks.py).
    r.sft_fraction = 0.0
    # Wrong answers the task's preference pairs reject in training (reward.paths / dpo.paths =
    # "task"), comma-separated kinds of jaxlm/data/tasks.py's NEGATIVES: "near" (off by 1-3),
    # "other" (other problems' answers), "empty", "trailing" (the answer and more text). The
    # held-out pairs are one "near" pair per held-out problem whatever this says.
    r.pair_negatives = "near"
    # Reward functions and weights, "name:weight,..." (jaxlm/stages/rl/rewards.py); the reward is
    # their weighted sum.
    r.rewards = "correct:1.0,format:0.1"
    # Completions sampled per prompt (G); the batch holds train.global_batch_size prompts.
    r.group_size = 8
    # Prompts as chat: each prompt is a user turn of the chat template (chat.*) followed by the
    # opening of the assistant's turn, and a completion also stops at chat.turn_end (the end of
    # the answer). False: BOS + the prompt's text. Required with rl.reward_model, whose pairs
    # were chat conversations (the reward model scores what it was trained on).
    r.chat = False
    # Tokens generated per completion at most; prompts get data.seq_len - max_new_tokens.
    r.max_new_tokens = 8
    # Sampling of the rollouts (the held-out evaluation decodes greedily).
    r.temperature = 1.0
    r.top_p = 1.0
    r.top_k = 0
    # Stop pieces besides the tokenizer's EOS, comma-separated (e.g. "\n"); kept in the output.
    r.stop = ""
    # Group-relative advantages: (r - group mean) / (group std + 1e-4) with the population std
    # ("std") or the sample std, Bessel-corrected ("sample_std": TRL's GRPOTrainer), or
    # r - group mean ("none", Dr. GRPO).
    r.advantage_scale = "std"
    # How token terms are averaged: "sequence" (mean over each completion's tokens, then over
    # completions: DeepSeekMath), "token" (mean over all completion tokens of the batch) or
    # "constant" (sum over tokens / (completions * max_new_tokens): Dr. GRPO).
    r.loss_norm = "sequence"
    # Clipped ratio objective: ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    # (clip_eps_high 0 = clip_eps).
    r.clip_eps = 0.2
    r.clip_eps_high = 0.0
    # Gradient steps on each rollout batch (the old policy's log-probs stay fixed).
    r.num_epochs = 1
    # rejection: a prompt's best completion is trained on when its reward reaches this.
    r.keep_min_reward = 1.0
    # A reward-stage run's checkpoints (same architecture and tokenizer as the policy),
    # restored frozen and sharded like the policy; its score at a completion's last token is
    # the completion's reward. ppo: required; rejection: ranks completions by it instead of
    # rl.rewards ("" = rl.rewards); grpo: unused.
    r.reward_model = ""
    # Its step; -1 = the newest.
    r.reward_model_step = -1
    # Weight beta of the KL(policy || reference) penalty against the frozen init_from params:
    # grpo's k3 term in the loss (0 builds no reference model), ppo's per-token reward
    # -beta (log pi_old - log ref) (its start value when ppo.kl_target > 0); rejection: unused.
    r.kl_coef = 0.04
    # Completions (prompt, completion, reward) logged to the console and TensorBoard per eval.
    r.log_samples = 4
    return r


def _fail(key: str, msg: str) -> None:
    raise config_error(key, msg)


def parse_weights(spec: str, key: str = "rl.rewards") -> list[tuple[str, float]]:
    """"name:weight,..." -> [(name, weight)]; a name without weight counts 1."""
    out = []
    for item in split_list(spec):
        name, _, weight = item.partition(":")
        try:
            out.append((name.strip(), float(weight) if weight.strip() else 1.0))
        except ValueError:
            _fail(key, f"{item!r}: the weight is not a number")
    if not out:
        _fail(key, "is empty; name at least one reward, e.g. 'correct:1.0'")
    return out


def check_rl(config: ml_collections.ConfigDict) -> None:
    r = config.rl
    check_choice("rl.task", r.task, TASKS)
    check_choice("rl.advantage_scale", r.advantage_scale, ADVANTAGE_SCALES)
    check_choice("rl.loss_norm", r.loss_norm, LOSS_NORMS)
    if r.task == "jsonl" and not split_list(r.paths):
        _fail("rl.paths", "is empty but rl.task='jsonl'; give jsonl globs of {prompt, answer}")
    if r.task == "arithmetic":
        check_at_least("rl.max_operand", r.max_operand, 1)
        check_at_least("rl.num_operands", r.num_operands, 2)
        if not r.operations or set(r.operations) - set("+-*"):
            _fail("rl.operations", f"{r.operations!r} must be made of '+', '-', '*'")
    from jaxlm.stages.rl.rewards import REWARDS  # a registry of plain Python functions

    for name, _ in parse_weights(r.rewards):
        if name not in REWARDS:
            _fail("rl.rewards", f"unknown reward {name!r}; one of {sorted(REWARDS)}")
    check_interval("rl.sft_fraction", r.sft_fraction, 0, 1, "[)")
    from jaxlm.data.tasks import NEGATIVES  # plain Python

    kinds = split_list(r.pair_negatives)
    if not kinds or set(kinds) - set(NEGATIVES):
        _fail("rl.pair_negatives", f"{r.pair_negatives!r}: give comma-separated kinds of "
              f"{list(NEGATIVES)}")
    check_at_least("rl.group_size", r.group_size, 1)
    if config.stage == "grpo" and r.group_size < 2:
        _fail("rl.group_size", "grpo compares each completion with the others of its prompt's "
              f"group: at least 2 are needed (got {r.group_size}, whose advantages are all 0)")
    if r.max_new_tokens < 1 or r.max_new_tokens >= config.data.seq_len:
        _fail("rl.max_new_tokens", f"must lie in [1, data.seq_len={config.data.seq_len}) "
              f"(the rest of a row holds the prompt), got {r.max_new_tokens}")
    if r.temperature <= 0:
        _fail("rl.temperature", f"rollouts sample: must be > 0, got {r.temperature}")
    check_interval("rl.top_p", r.top_p, 0, 1, "(]")
    check_at_least("rl.top_k", r.top_k, 0)
    check_interval("rl.clip_eps", r.clip_eps, 0, 1, "()")
    if r.clip_eps_high < 0:
        _fail("rl.clip_eps_high", f"must be >= 0 (0 = rl.clip_eps), got {r.clip_eps_high}")
    check_at_least("rl.num_epochs", r.num_epochs, 1)
    check_at_least("rl.kl_coef", r.kl_coef, 0)
    if r.chat:
        from jaxlm.data.chat import check_chat_config  # plain Python

        check_chat_config(config.chat, split_list(config.data.special_tokens),
                          config.data.tokenizer_path)
    if r.reward_model and not r.chat:
        _fail("rl.chat", f"is False but rl.reward_model={r.reward_model!r} was trained on chat "
              "pairs: set rl.chat=True so its rollouts are rendered as its pairs were")
    starts = config.init_from.path or config.init_from.config
    if r.kl_coef > 0 and config.stage == "grpo" and not starts:
        _fail("init_from.path", f"rl.kl_coef={r.kl_coef} needs a reference model: the "
              "checkpoint the policy starts from, or init_from.config (or set rl.kl_coef=0)")


def default_ppo_config() -> ml_collections.ConfigDict:
    p = ml_collections.ConfigDict()
    # Adaptive KL coefficient (Ziegler et al. 2019), starting at rl.kl_coef: 0 keeps it fixed;
    # > 0 moves it towards this mean per-completion KL, by at most 20% of
    # (kl / target - 1) * B / kl_horizon a step.
    p.kl_target = 0.0
    p.kl_horizon = 10000
    # Weight of the clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2) in the objective.
    p.value_coef = 0.1
    # Value predictions move at most this far from the rollout's per update.
    p.value_clip = 0.2
    # The value head's learning rate is optim.learning_rate times this (Adam's step on a
    # weight does not grow with its loss weight, so value_coef cannot speed the head up: a
    # zero-initialised head at a policy's small learning rate lags scores of a few units for
    # hundreds of steps). 1: the same learning rate as the policy.
    p.value_lr_scale = 1.0
    # The first steps train only the value head (no policy loss, the trunk frozen), so the
    # policy's first updates already have a baseline. 0: none.
    p.value_warmup_steps = 0
    # Whiten the advantages over the batch's completion tokens.
    p.whiten = True
    # The reward model's score as the reward: "none" as it is; "group_mean" minus the mean
    # score of the prompt's rl.group_size completions, so what the policy is rewarded for is how
    # a completion compares with the prompt's others, not how the reward model rates the prompt
    # (a value head that cannot yet predict that leaves it in every advantage).
    p.score_baseline = "none"
    # The reward model's score before the baseline: "none" as it is; "sigmoid" sigmoid(score),
    # the Bradley-Terry probability that the completion is preferred to one scored 0, which
    # saturates at both ends, so a completion far below the others is not punished more than one
    # just below (a raw score rewards leaving the reward model's far tail, -10, more than
    # choosing between the answers it nearly ties).
    p.score_transform = "none"
    # Generalised advantage estimation's discount and lambda over completion tokens.
    p.gamma = 1.0
    p.lam = 0.95
    return p


def check_ppo(config: ml_collections.ConfigDict) -> None:
    p = config.ppo
    if not config.rl.reward_model:
        _fail("rl.reward_model", "is empty; ppo needs the checkpoints directory of a reward run")
    if not (config.init_from.path or config.init_from.config):
        _fail("init_from.path", "ppo needs the policy to start from (an SFT run's checkpoints, "
              "or init_from.config): it is also the KL reference")
    for key in ("kl_target", "value_coef", "value_clip", "value_warmup_steps"):
        check_at_least(f"ppo.{key}", p[key], 0)
    if p.score_transform not in ("none", "sigmoid"):
        _fail("ppo.score_transform", f"{p.score_transform!r} is not 'none' or 'sigmoid'")
    if p.score_baseline not in ("none", "group_mean"):
        _fail("ppo.score_baseline", f"{p.score_baseline!r} is not 'none' or 'group_mean'")
    if p.score_baseline == "group_mean" and config.rl.group_size < 2:
        _fail("rl.group_size", "ppo.score_baseline='group_mean' needs 2 or more completions "
              f"per prompt, got {config.rl.group_size}")
    if p.value_lr_scale <= 0:
        _fail("ppo.value_lr_scale", f"must be > 0, got {p.value_lr_scale}")
    check_at_least("ppo.kl_horizon", p.kl_horizon, 1)
    check_interval("ppo.gamma", p.gamma, 0, 1)
    check_interval("ppo.lam", p.lam, 0, 1)


RL = Section("rl", default_rl_config, check_rl)
PPO = Section("ppo", default_ppo_config, check_ppo)
