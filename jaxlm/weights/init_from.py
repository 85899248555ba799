"""Parameters that come from elsewhere: another run's checkpoint (`init_from`), with its LoRA
adapters merged, and the frozen reference model some stages compare against.

Every path restores the checkpoint once (`jaxlm.weights.restore`), straight into this run's
shardings, and fills the leaves the checkpoint lacks (this run's new LoRA adapters, a reward
head) from a params-only init: no optimizer state is built for them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import traverse_util

from jaxlm.models import lora
from jaxlm.models.quant import quantizer
from jaxlm.parallel import sharding
from jaxlm.weights import restore


def _step(config: ml_collections.ConfigDict) -> int | None:
    return None if config.init_from.step < 0 else config.init_from.step


def init_from_params(program: Any) -> Any:
    """The init_from checkpoint's params, sharded like `program`'s state.

    A checkpoint of a LoRA run has its adapters merged into its base weights first, so no
    trained adapter is dropped and any rank can follow. Params the model has and the (merged)
    checkpoint lacks start from a fresh params-only init (seed `config.seed`)."""
    c = program.config
    saved = restore.read_checkpoint(c.init_from.path, _step(c))
    flat = traverse_util.flatten_dict(program.abstract_params, sep="/")
    names = set(saved.param_shapes())
    adapters = {name for name in names if name.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    base = {k: v for k, v in flat.items() if k in names and k not in adapters}
    # QLoRA: the checkpoint's float weights are read as such and quantized on device.
    float_base = {k: _float_abstract(v, program.model_cfg.weight_dtype) for k, v in base.items()}
    restored = restore.restore(
        saved.directory, saved.step, model_cfg=program.model_cfg,
        abstract_params=traverse_util.unflatten_dict(float_base, sep="/"),
        merge_lora=bool(adapters)).params
    if float_base != base:
        restored = _quantized_like(program, restored, traverse_util.unflatten_dict(base, sep="/"))
    logging.info("params from %s (step %d)%s", saved.directory, saved.step,
                 "; its LoRA adapters merged, this run's own (if any) start fresh"
                 if adapters else "")
    fresh_names = sorted(name for name in flat if name not in base)
    if not fresh_names:
        return restored
    logging.info("params not in %s start fresh: %s", saved.directory, fresh_names)
    out = traverse_util.flatten_dict(program.init_params(jax.random.key(c.seed)), sep="/")
    out.update(traverse_util.flatten_dict(restored, sep="/"))
    return traverse_util.unflatten_dict(out, sep="/")


def _float_abstract(leaf: Any, dtype: Any) -> jax.ShapeDtypeStruct:
    """The float weight a quantized (QArray) abstract param is made from; others as they are."""
    if not quantizer.is_qarray(leaf):
        return leaf
    return jax.ShapeDtypeStruct(leaf.qvalue.shape, dtype, sharding=leaf.qvalue.sharding)


def _quantized_like(program: Any, params: Any, abstract: Any) -> Any:
    """`params` (float) quantized with the run's `quant` spec, laid out as `abstract`."""
    out_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    with sharding.activate(program.mesh):
        return jax.jit(functools.partial(quantizer.quantize_params, spec=program.model_cfg.quant),
                       out_shardings=out_shardings)(params)


def frozen_copy(program: Any, params: Any) -> Any:
    """A device copy of `params` that survives the train step donating the state's."""
    with sharding.activate(program.mesh):
        return jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                       out_shardings=program.reference_shardings)(params)
