"""A reward-stage checkpoint as a frozen scorer of rollouts (ppo, and rejection sampling).

The reward model is the model its checkpoint's saved config describes (its own width and depth,
the scalar head of the reward stage, a LoRA run's adapters merged), restored once through
`jaxlm.weights.restore`, frozen, laid out by its logical axis names on the policy's mesh, and
scores each rollout row at its last token in one forward pass: the Program's
"reward_score" program (`score_program`, built by `program.build`, so the fit check compiles it
and the step's FLOPs count it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlm.inference.sampler import param_shardings
from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run.train_state import abstract_boxed_params
from jaxlm.scaling import flops as scaling
from jaxlm.stages.rl.loop import place
from jaxlm.stages.stage import JitProgram
from jaxlm.weights import restore

if TYPE_CHECKING:
    from jaxlm.run.program import Program

# The Program's scoring program (`Program.programs` name), and the run-long params it holds.
SCORE = "reward_score"
PARAMS = "reward_model"


def sequence_scores(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array,
                    lengths_N: jax.Array, num_new: int, *, model: nn.Module) -> jax.Array:
    """A reward model's score of each rollout row at its last real token [N]: the
    completion's last (its stop token, chat.turn_end, when it stopped: the token the reward
    stage reads a pair's answer at), or the prompt's when the completion is empty."""
    valid = valid_NxS.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    scores_NxS = model.apply({"params": params}, tokens_NxS, positions_BxL=positions,
                             segment_ids_BxL=valid)
    last_N = tokens_NxS.shape[1] - num_new + lengths_N - 1
    return jnp.take_along_axis(scores_NxS, last_N[:, None], axis=1)[:, 0]


def model_config(program: Program) -> ModelConfig:
    """The reward model's shape: the one its checkpoint's saved config describes (rl.reward_model,
    on the policy's vocabulary), or without a checkpoint the policy's architecture with the reward
    stage's score head."""
    r = program.config.rl
    if not r.reward_model:
        return dataclasses.replace(program.model_cfg, reward_head=True, lora_rank=0)
    saved = restore.read_checkpoint(r.reward_model,
                                    None if r.reward_model_step < 0 else r.reward_model_step)
    cfg = restore.model_config(saved, program.model_cfg.vocab_size, merge_lora=True)
    if not cfg.reward_head:
        raise ValueError(f"config key rl.reward_model: {r.reward_model} is not a reward-stage "
                         "run (its model has no scalar reward head)")
    check_same_chat(program.config, saved.config)
    return cfg


def check_same_chat(config: Any, saved_config: Any) -> None:
    """The run renders rollouts with the chat template the reward model's pairs had; raises
    naming the first chat.* key that differs."""
    theirs = (saved_config or {}).get("chat")
    if theirs is None:
        return
    for key, value in config.chat.items():
        if key in theirs and theirs[key] != value:
            raise ValueError(f"config key chat.{key}: {value!r}, but the reward model "
                             f"{config.rl.reward_model} was trained with {theirs[key]!r}; "
                             "rollouts must be rendered as its pairs were")


def score_program(program: Program) -> JitProgram:
    """The jitted scoring of one step's B * G rollout rows: the reward model's params sharded
    by their logical axes on the run's mesh, rows over the data axes. Its FLOPs are one forward
    pass (score head, no vocabulary head) over every row's data.seq_len tokens."""
    c, mesh = program.config, program.mesh
    cfg = model_config(program)
    model = Transformer(cfg)
    params_sh = param_shardings(cfg, mesh)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            nn.meta.unbox(abstract_boxed_params(model, 1)), params_sh)
    n, s = c.train.global_batch_size * c.rl.group_size, c.data.seq_len
    rows_sh, row_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    fn = jax.jit(functools.partial(sequence_scores, num_new=c.rl.max_new_tokens, model=model),
                 in_shardings=(params_sh, rows_sh, rows_sh, row_sh), out_shardings=row_sh)
    args = (abstract, jax.ShapeDtypeStruct((n, s), jnp.int32, sharding=rows_sh),
            jax.ShapeDtypeStruct((n, s), jnp.int32, sharding=rows_sh),
            jax.ShapeDtypeStruct((n,), jnp.int32, sharding=row_sh))
    return JitProgram(fn, args, flops=n * s * scaling.forward_flops_per_token(
        cfg, s, vocab_head=False), per_step=True, reads=(PARAMS,), holds={PARAMS: abstract})


class RewardModel:
    """Frozen reward-model params (restored from `path`, or given) and the Program's scoring
    program."""

    def __init__(self, program: Program, path: str, step: int | None = None, params: Any = None,
                 tokenizer: Any = None):
        self.scorer, self.mesh = program.programs[SCORE], program.mesh
        if params is None:
            restored = restore.restore(path, step, self.mesh, tokenizer=tokenizer,
                                       abstract_params=self.scorer.abstract_args[0],
                                       merge_lora=True)
            params = restored.params
            logging.info("reward model from %s (step %d)", restored.directory, restored.step)
        self.params = params

    def score(self, seqs: dict[str, np.ndarray], lengths_BxG: np.ndarray) -> np.ndarray:
        """Scores [B, G] of rollout rows (`jaxlm.stages.rl.rollout.sequences`), as host values."""
        b, g = lengths_BxG.shape
        flat = place({"tokens": seqs["tokens"].reshape(b * g, -1),
                      "valid": seqs["valid"].reshape(b * g, -1),
                      "lengths": lengths_BxG.reshape(-1).astype(np.int32)}, self.mesh)
        with sharding.activate(self.mesh):
            out = self.scorer(self.params, flat["tokens"], flat["valid"], flat["lengths"])
        return np.asarray(jax.device_get(out)).reshape(b, g).astype(np.float32)
