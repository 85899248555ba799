"""A reward-stage checkpoint as a frozen scorer of rollouts (ppo, and rejection sampling).

The reward model is the model its checkpoint's saved config describes (its own width and depth,
the scalar head of the reward stage, a LoRA run's adapters merged), restored once through
`jaxlm.weights.restore`, frozen, laid out by its logical axis names on the policy's mesh (heads
and MLP over `tensor`, ...), and scores each rollout row at its last token in one jitted
forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.stages.rl.host import place
from jaxlm.weights import restore


def sequence_scores(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array,
                    lengths_N: jax.Array, num_new: int, *, model: nn.Module) -> jax.Array:
    """A reward model's score of each rollout row at its last token (the completion's last, or
    the prompt's when the completion is empty) [N]."""
    valid = valid_NxS.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    scores_NxS = model.apply({"params": params}, tokens_NxS, positions_BxL=positions,
                             segment_ids_BxL=valid)
    last_N = tokens_NxS.shape[1] - num_new + lengths_N - 1
    return jnp.take_along_axis(scores_NxS, last_N[:, None], axis=1)[:, 0]


class RewardModel:
    """Frozen reward-model params (restored from the reward run's checkpoint `path`, or given)
    and their scoring jit. `tokenizer`: the policy's, which the reward run must share (checked
    against its checkpoint; it also gives the vocabulary)."""

    def __init__(self, program: Any, path: str, step: int | None = None, params: Any = None,
                 tokenizer: Any = None):
        self.mesh = program.mesh
        if params is None:
            restored = restore.restore(path, step, self.mesh, tokenizer=tokenizer,
                                       merge_lora=True)
            cfg, params = restored.model_cfg, restored.params
            logging.info("reward model from %s (step %d): d_model=%d layers=%d",
                         restored.directory, restored.step, cfg.d_model, cfg.num_layers)
        else:
            cfg = _given_params_model(program, path, step, tokenizer)
        if not cfg.reward_head:
            raise ValueError(f"reward model {path}: its run's stage has no scalar reward head "
                             "(give the checkpoints of a reward-stage run)")
        self.model = Transformer(cfg)
        self.params = params
        self.num_new = program.config.rl.max_new_tokens
        self._score = jax.jit(functools.partial(sequence_scores, num_new=self.num_new,
                                                model=self.model),
                              out_shardings=sharding.batch_sharding(self.mesh, 1))

    def score(self, seqs: dict[str, np.ndarray], lengths_BxG: np.ndarray) -> np.ndarray:
        """Scores [B, G] of rollout rows (`jaxlm.stages.rl.rollout.sequences`), as host values."""
        b, g = lengths_BxG.shape
        flat = place({"tokens": seqs["tokens"].reshape(b * g, -1),
                      "valid": seqs["valid"].reshape(b * g, -1),
                      "lengths": lengths_BxG.reshape(-1).astype(np.int32)}, self.mesh)
        with sharding.activate(self.mesh):
            out = self._score(self.params, flat["tokens"], flat["valid"], flat["lengths"])
        return np.asarray(jax.device_get(out)).reshape(b, g).astype(np.float32)


def _given_params_model(program: Any, path: str, step: int | None, tokenizer: Any
                        ) -> ModelConfig:
    """The model of reward params given by the caller: the one `path`'s checkpoint describes,
    or without a path the policy's architecture with the scalar head."""
    if not path:
        return dataclasses.replace(program.model_cfg, reward_head=True, lora_rank=0)
    saved = restore.read_checkpoint(path, step)
    if tokenizer is not None:
        restore.check_tokenizer(saved, tokenizer)
    return restore.model_config(saved, getattr(tokenizer, "vocab_size", None), merge_lora=True)
