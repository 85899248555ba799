"""Win rate of a post-trained policy (SFT, DPO, RL) against its reference, judged by a reward
model checkpoint on held-out prompts.

    python -m jaxlm.tools.eval --workdir=DPO_RUN --tasks= --reward_model=RM_RUN
    [--reference=SFT_RUN]

The prompts are the held-out pairs of the policy run's `dpo` data section (dpo.paths with its
holdout, or dpo.eval_paths), rendered with its chat template. Policy and reference each answer
greedily (until the turn-end marker or EOS); the reward model scores prompt + answer at the
answer's last token, as in training. A prompt is a win (1), tie (0.5) or loss (0); the win rate
is their mean. The reference defaults to the policy's init_from checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import chat, preference
from jaxlm.evaluation.engine import Engine
from jaxlm.evaluation.target import Target, load_target
from jaxlm.inference.sampler import Request
from jaxlm.inference.scoring import length_bucket
from jaxlm.models import Transformer
from jaxlm.parallel import sharding


def _rewards_fn(model: Transformer):
    def rewards(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
        scores_BxL = model.apply({"params": params}, tokens_BxL,
                                 segment_ids_BxL=valid_BxL.astype(jnp.int32))
        last_B = jnp.maximum(jnp.sum(valid_BxL, axis=-1) - 1, 0)
        return jnp.take_along_axis(scores_BxL, last_B[:, None], axis=-1)[:, 0]

    return jax.jit(rewards)


@functools.lru_cache(maxsize=4)
def _cached_rewards_fn(cfg: Any):
    return _rewards_fn(Transformer(cfg))


def sequence_rewards(judge: Target, sequences: list[list[int]], batch_size: int) -> np.ndarray:
    """The reward model's score at the last token of each sequence."""
    if not judge.model_cfg.reward_head:
        raise ValueError(f"--reward_model {judge.directory} is not a reward model (its run's "
                         "stage has no reward head)")
    fn = _cached_rewards_fn(judge.model_cfg)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        length = length_bucket(max(len(s) for s in chunk), judge.model_cfg.max_seq_len)
        tokens = np.zeros((batch_size, length), np.int32)
        valid = np.zeros((batch_size, length), bool)
        valid[:, 0] = True
        for i, s in enumerate(chunk):
            s = s[-length:]
            tokens[i, :len(s)], valid[i, :len(s)] = s, True
        with sharding.activate(judge.mesh):
            out.append(np.asarray(jax.device_get(fn(judge.params, tokens, valid)))[:len(chunk)])
    return np.concatenate(out)


def heldout_prompts(policy: Target, limit: int) -> list[list[int]]:
    """Chat-rendered prompt ids of the policy run's held-out preference pairs."""
    pairs = preference.split_pairs(policy.config, "eval", "dpo")
    template = chat.template_from_config(policy.config.chat)
    raw = policy.tokenizer.raw
    prompts = [list(chat.prompt_ids(raw, p.prompt, template=template)) for p in pairs]
    return prompts[:limit] if limit else prompts


def answers(engine: Engine, prompts: list[list[int]], stop: tuple[int, ...],
            max_new_tokens: int) -> list[list[int]]:
    """Greedy answers (ending with their stop token when one was hit)."""
    out: list[list[int]] = []
    budget = min(max_new_tokens, engine.max_length - 1)
    for start in range(0, len(prompts), engine.batch_size):
        chunk = [p[-(engine.max_length - budget):]
                 for p in prompts[start:start + engine.batch_size]]
        requests = [Request(p, budget, stop) for p in chunk]
        filler = Request([engine.tokenizer.prefix_id], 0, ())
        done = engine.sampler.generate(requests + [filler] * (engine.batch_size - len(chunk)))
        out += [c.tokens for c in done[:len(chunk)]]
    return out


def evaluate(policy: Target, engine: Engine, reward_model: str, *, reference: str = "",
             limit: int = 0, max_new_tokens: int = 64) -> dict[str, float]:
    """Win rate of `policy` (served by `engine`) against its reference, judged by the reward
    model run at `reward_model`."""
    ref_dir = reference or policy.config.init_from.path
    if not ref_dir:
        raise ValueError("the checkpoint has no init_from reference; pass --reference=RUN")
    ref_step = None if reference or policy.config.init_from.step < 0 else \
        policy.config.init_from.step
    judge = load_target(reward_model, None, policy.mesh)
    if not judge.model_cfg.reward_head:
        raise ValueError(f"--reward_model {reward_model} is not a reward model (its run's "
                         "stage has no reward head)")
    ref = load_target(ref_dir, ref_step, policy.mesh)
    for other, what in ((ref, "reference"), (judge, "reward model")):
        if other.tokenizer.encode("def f(x):\n") != policy.tokenizer.encode("def f(x):\n") or \
                other.model_cfg.vocab_size != policy.model_cfg.vocab_size:
            raise ValueError(f"the {what} {other.directory} uses another tokenizer")
    prompts = heldout_prompts(policy, limit)
    if not prompts:
        raise ValueError("no held-out prompts (dpo.paths / dpo.eval_paths of the policy run)")
    template = chat.template_from_config(policy.config.chat)
    _, end_id = chat.special_ids(policy.tokenizer.raw, template)
    stop = (end_id, policy.tokenizer.eos_id)
    mine = answers(engine, prompts, stop, max_new_tokens)
    if ref.model_cfg == policy.model_cfg:  # same architecture: reuse the compiled decoder
        policy_params, engine.params = engine.params, ref.params
        try:
            theirs = answers(engine, prompts, stop, max_new_tokens)
        finally:
            engine.params = policy_params
    else:
        theirs = answers(Engine(ref.model_cfg, ref.params, ref.tokenizer, ref.mesh,
                                batch_size=engine.batch_size, max_length=engine.max_length),
                         prompts, stop, max_new_tokens)
    r_policy = sequence_rewards(judge, [p + a for p, a in zip(prompts, mine)], engine.batch_size)
    r_ref = sequence_rewards(judge, [p + a for p, a in zip(prompts, theirs)], engine.batch_size)
    wins = np.where(r_policy > r_ref, 1.0, np.where(r_policy == r_ref, 0.5, 0.0))
    return {"alias": "winrate", "win_rate": float(wins.mean()),
            "reward_policy": float(r_policy.mean()), "reward_reference": float(r_ref.mean()),
            "prompts": len(prompts)}
