"""A reward-stage checkpoint as a frozen scorer of rollouts (ppo, and rejection sampling).

The reward model has the policy's architecture with the scalar head of the reward stage; it is
restored once, frozen, with the policy's logical shardings (heads and MLP over `tensor`, ...),
and scores each rollout row at its last token in one jitted forward pass.
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

from jaxlm.inference.sampler import param_shardings
from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run.checkpoint import restore_params
from jaxlm.run.train_state import abstract_boxed_params
from jaxlm.stages.rl.host import place


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
    """Frozen reward-model params (restored from `path`, or given) and their scoring jit."""

    def __init__(self, program: Any, path: str, step: int | None = None, params: Any = None):
        cfg = dataclasses.replace(program.model_cfg, reward_head=True, lora_rank=0)
        self.model, self.mesh = Transformer(cfg), program.mesh
        if params is None:
            shapes = nn.meta.unbox(abstract_boxed_params(self.model, 1))
            abstract = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes,
                param_shardings(cfg, self.mesh))
            params = restore_params(path, step, abstract)
            logging.info("reward model from %s", path)
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
