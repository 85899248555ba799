"""A supervised warm-up of a tiny policy on the arithmetic task's train answers: the
"SFT-ed checkpoint" that the RL tests start from (in memory, a few seconds on CPU)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.data.tasks import split_examples
from jaxlm.parallel import sharding
from jaxlm.stages.rl.prompts import make_prompt_iterator, prompt_length, tokenize_prompts
from jaxlm.stages.rl.rollout import sequence_logps, sequences


def answer_rows(config: Any, tokenizer: Any) -> dict[str, np.ndarray]:
    """Every train prompt with its answer + EOS as the completion, in rollout layout [N, 1, S]."""
    examples = split_examples(config, "train")
    prompts = tokenize_prompts(examples, tokenizer, prompt_length(config))
    t = config.rl.max_new_tokens
    completion = np.zeros((len(examples), 1, t), np.int32)
    lengths = np.zeros((len(examples), 1), np.int32)
    for i, ex in enumerate(examples):
        ids = tokenizer.encode(ex["answer"])[:t - 1] + [tokenizer.eos_id]
        completion[i, 0, :len(ids)], lengths[i, 0] = ids, len(ids)
    return sequences(np.stack([p["prompt"] for p in prompts]),
                     np.stack([p["prompt_valid"] for p in prompts]), completion, lengths)


def warm_up(program: Any, params: Any, tokenizer: Any, steps: int, lr: float = 3e-3) -> Any:
    """`steps` full-batch Adam steps on the answers' negative log-likelihood."""
    rows = {k: jnp.asarray(v[:, 0]) for k, v in answer_rows(program.config, tokenizer).items()}
    tx = optax.adam(lr)

    def loss(p):
        logp = sequence_logps(p, rows["tokens"], rows["valid"], rows["mask"].shape[-1],
                              model=program.model)
        return -jnp.sum(logp * rows["mask"]) / jnp.sum(rows["mask"])

    @jax.jit
    def step(p, opt):
        grads = jax.grad(loss)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    with sharding.activate(program.mesh):
        for _ in range(steps):
            params, opt = step(params, opt)
    return params


def rewards_after_warm_up(program: Any, host: Any, tokenizer: Any, rounds: int
                          ) -> list[dict[str, float]]:
    """Each step's metrics of `rounds` RL steps (`host.train` on batches of 16 training
    prompts) from the policy after 60 warm-up steps: what the learning tests compare."""
    state = program.state_from_params(
        warm_up(program, program.init_params(jax.random.key(0)), tokenizer, steps=60))
    it = make_prompt_iterator(program.config, tokenizer, split="train", batch_size=16)
    history = []
    for _ in range(rounds):
        state, metrics = host.train(state, next(it))
        history.append(metrics)
    return history
