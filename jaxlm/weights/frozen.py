"""Frozen models a stage's steps read but never train (a distillation teacher).

A stage names them with `Stage.frozen_models(config) -> {name: (checkpoint directory, step)}`.
`program.build` turns each into a `FrozenModel`: the model its checkpoint's saved config
describes (its own shape; this run's vocabulary and mesh), and the abstract params sharded by
their logical axis names on the run's mesh. The steps then take one more argument, the dict
{name: params}, after the batch (and the reference params, where a stage has them);
`restore` reads it from the checkpoints once (`jaxlm.weights.restore`), straight into those
shardings.

The frozen models read this run's token ids, so they must share its tokenizer: `restore`
compares the tokenizer recorded in each checkpoint with the run's and refuses a mismatch, and
`jaxlm.weights.restore.source_tokenizer` lets a run with no tokenizer of its own use theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.errors import ConfigError
from jaxlm.run.train_state import abstract_boxed_params
from jaxlm.weights import restore as restore_lib


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """One frozen model of a program: where its params come from and how they are laid out."""

    name: str
    directory: str  # the directory of step checkpoints
    step: int  # the step read (the newest when the stage named none, fixed at build)
    model_cfg: ModelConfig
    model: Transformer
    abstract_params: Any  # ShapeDtypeStructs with the run mesh's NamedShardings

    @property
    def shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.abstract_params)


def build(specs: dict[str, tuple[str, int | None]], config: ml_collections.ConfigDict,
          mesh: Mesh, vocab_size: int) -> dict[str, FrozenModel]:
    """FrozenModels of a stage's `frozen_models(config)` on `mesh` (shapes only, no IO beyond
    each checkpoint's saved config): each the language model its checkpoint's saved config
    describes, on this run's vocabulary and mesh, without dropout."""
    out = {}
    mine = config_lib.model_config(config, vocab_size)
    for name, (path, step) in specs.items():
        saved = restore_lib.read_checkpoint(path, step)
        own = _own_vocab_size(saved)
        model_cfg = restore_lib.model_config(saved, own or vocab_size, language_model=True,
                                             like=config)
        if (model_cfg.vocab_size, model_cfg.padded_vocab_size) != (mine.vocab_size,
                                                                   mine.padded_vocab_size):
            key = ("model.vocab_size" if config.model.vocab_size or own == vocab_size
                   else "data.tokenizer_path")
            raise ConfigError(f"config key {key}: frozen model {name!r} ({saved.directory}, step "
                              f"{saved.step}) has a vocabulary of {model_cfg.vocab_size} ids "
                              f"({model_cfg.padded_vocab_size} rows padded), this run's model "
                              f"{mine.vocab_size} ({mine.padded_vocab_size}): they must read the "
                              "same token ids; leave data.tokenizer_path empty to use its "
                              "tokenizer, and model.vocab_size at 0", key=key)
        model = Transformer(model_cfg)
        boxed = abstract_boxed_params(model, config.data.seq_len)
        abstract = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh))
        out[name] = FrozenModel(name, saved.directory, saved.step, model_cfg, model, abstract)
    return out


def _own_vocab_size(saved: restore_lib.SavedRun) -> int | None:
    """The vocabulary the checkpoint's model was built with: its saved model.vocab_size, else
    the size of the tokenizer it records; None when neither can be told (the run's own is
    assumed, and the restore checks the tokenizer)."""
    if saved.config is not None and saved.config.model.get("vocab_size", 0):
        return int(saved.config.model.vocab_size)
    try:
        tokenizer = restore_lib.saved_tokenizer(saved)
    except (OSError, ValueError):
        return None
    return tokenizer.vocab_size if tokenizer is not None else None


def random_params(frozen: dict[str, FrozenModel], rng: jax.Array, seq_len: int
                  ) -> dict[str, Any]:
    """{name: freshly initialised params} in each frozen model's shardings: for measurements
    whose cost does not depend on the weights (benchmarks/train_throughput.py)."""
    import jax.numpy as jnp

    out = {}
    for name, f in frozen.items():
        init = lambda r, m=f.model: nn.meta.unbox(  # noqa: E731
            m.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"])
        mesh = jax.tree.leaves(f.shardings)[0].mesh
        with sharding.activate(mesh):
            out[name] = jax.jit(init, out_shardings=f.shardings)(rng)
    return out


def restore(frozen: dict[str, FrozenModel], tokenizer: Any) -> dict[str, Any]:
    """{name: params} of every frozen model, restored into its shardings; each checkpoint must
    have been trained with `tokenizer` (`jaxlm.weights.restore.check_tokenizer`)."""
    out = {}
    for name, f in frozen.items():
        out[name] = restore_lib.restore(f.directory, f.step, tokenizer=tokenizer,
                                        model_cfg=f.model_cfg,
                                        abstract_params=f.abstract_params).params
        logging.info("frozen model %r: %s (step %d), d_model=%d layers=%d", name, f.directory,
                     f.step, f.model_cfg.d_model, f.model_cfg.num_layers)
    return out
