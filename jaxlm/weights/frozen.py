"""Frozen models a stage's steps read but never train (a distillation teacher).

A stage names them with `Stage.frozen_models(config) -> {name: (checkpoint directory, step)}`.
`program.build` turns each into a `FrozenModel`: the model its checkpoint's saved config
describes (its own shape; this run's vocabulary and mesh), and the abstract params sharded by
their logical axis names on the run's mesh. The steps then take one more argument, the dict
{name: params}, after the batch (and the reference params, where a stage has them);
`restore` reads it from the checkpoints once, straight into those shardings.

The frozen models read this run's token ids, so they must share its tokenizer: `restore`
compares the tokenizer recorded in each checkpoint with the run's and refuses a mismatch, and
`checkpoint_tokenizer` lets a run with no tokenizer of its own use the first frozen model's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run import checkpoint
from jaxlm.run import config as config_lib
from jaxlm.run.train_state import abstract_boxed_params


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """One frozen model of a program: where its params come from and how they are laid out."""

    name: str
    directory: str
    step: int | None
    model_cfg: ModelConfig
    model: Transformer
    abstract_params: Any  # ShapeDtypeStructs with the run mesh's NamedShardings

    @property
    def shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.abstract_params)


def checkpoint_directory(path: str) -> str:
    """`<workdir>/checkpoints` for a run's workdir, else `path` itself."""
    nested = os.path.join(path, "checkpoints")
    return nested if "://" not in path and epath.Path(nested).is_dir() else path


def saved_model_config(directory: str, step: int | None, config: ml_collections.ConfigDict,
                       vocab_size: int) -> ModelConfig:
    """The ModelConfig of a checkpoint's saved run config, on this run's vocabulary and mesh,
    without dropout."""
    saved = ml_collections.ConfigDict(checkpoint.read_saved_json(directory, step, "config"))
    if saved.get("stage") == "reward":
        raise ValueError(f"checkpoint {directory} is a reward model (no vocabulary head)")
    saved.stage = "pretrain"  # the plain language model, whatever stage trained it
    saved.mesh = config.mesh  # laid out on this run's mesh
    saved.train = config.train
    saved.model.lora.dropout = 0.0
    cfg = config_lib.model_config(saved, vocab_size)
    mine = config_lib.model_config(config, vocab_size)
    if (cfg.vocab_size, cfg.padded_vocab_size) != (mine.vocab_size, mine.padded_vocab_size):
        raise ValueError(f"checkpoint {directory}: its model has {cfg.vocab_size} vocabulary "
                         f"rows ({cfg.padded_vocab_size} padded), this run's {mine.vocab_size} "
                         f"({mine.padded_vocab_size}); set model.vocab_size={cfg.vocab_size}")
    return cfg


def build(specs: dict[str, tuple[str, int | None]], config: ml_collections.ConfigDict,
          mesh: Mesh, vocab_size: int) -> dict[str, FrozenModel]:
    """FrozenModels of a stage's `frozen_models(config)` on `mesh` (shapes only, no IO beyond
    each checkpoint's saved config)."""
    out = {}
    seq_len = config.data.seq_len
    for name, (path, step) in specs.items():
        directory = checkpoint_directory(path)
        model_cfg = saved_model_config(directory, step, config, vocab_size)
        model = Transformer(model_cfg)
        boxed = abstract_boxed_params(model, seq_len)
        abstract = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh))
        out[name] = FrozenModel(name, directory, step, model_cfg, model, abstract)
    return out


def _saved_tokenizer(directory: str, step: int | None) -> tuple[str, str]:
    extra = checkpoint.read_saved_json(directory, step, "extra")
    return extra.get("tokenizer_path", ""), extra.get("tokenizer_sha256", "")


def check_tokenizer(frozen: FrozenModel, tokenizer: Any) -> None:
    """Raises unless `frozen`'s checkpoint was trained with `tokenizer` (same sha256, or the
    same path when the checkpoint records no hash)."""
    path, sha = _saved_tokenizer(frozen.directory, frozen.step)
    mine = getattr(tokenizer, "sha256", "")
    same = sha == mine if sha and mine else \
        os.path.abspath(path) == os.path.abspath(getattr(tokenizer, "path", ""))
    if not same:
        raise ValueError(
            f"frozen model {frozen.name!r} ({frozen.directory}) was trained with tokenizer "
            f"{path!r} (sha256 {sha[:12] or '?'}), this run uses {tokenizer.path!r} (sha256 "
            f"{mine[:12] or '?'}); they must be the same tokenizer (set data.tokenizer_path to "
            "the frozen model's, or leave it empty to use it)")


def tokenizer(config: ml_collections.ConfigDict) -> Any:
    """The tokenizer recorded in the first frozen model's checkpoint, for a run whose
    data.tokenizer_path is empty; None when the stage has no frozen model or one is set."""
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.stages import get_stage

    specs = get_stage(config.stage).frozen_models(config)
    if config.data.tokenizer_path or not specs:
        return None
    path, step = next(iter(specs.values()))
    saved_path = _saved_tokenizer(checkpoint_directory(path), step)[0]
    if not saved_path:
        return None
    logging.info("tokenizer of the frozen model's run: %s", saved_path)
    return load_tokenizer(saved_path)


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
    """{name: params} of every frozen model, restored into its shardings."""
    out = {}
    for name, f in frozen.items():
        check_tokenizer(f, tokenizer)
        out[name] = checkpoint.restore_params(f.directory, f.step, f.abstract_params)
        logging.info("frozen model %r: %s (step %s), d_model=%d layers=%d", name, f.directory,
                     "newest" if f.step is None else f.step, f.model_cfg.d_model,
                     f.model_cfg.num_layers)
    return out
