"""Parameters that come from elsewhere: another run's checkpoint (`init_from`), with its LoRA
adapters merged, and the frozen reference model some stages compare against.

Every path restores the checkpoint once, straight into this run's shardings, and fills the
leaves the checkpoint lacks (this run's new LoRA adapters, a reward head) from a params-only
init: no optimizer state is built for them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import qwix
from absl import logging
from flax import traverse_util

from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models import Transformer, lora
from jaxlm.models.quant import quantizer
from jaxlm.parallel import sharding
from jaxlm.run.checkpoint import read_saved_json, restore_params, saved_param_names
from jaxlm.run.train_state import abstract_boxed_params


def _step(config: ml_collections.ConfigDict) -> int | None:
    return None if config.init_from.step < 0 else config.init_from.step


def init_from_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """A run that starts from another run's params (init_from) uses that run's tokenizer,
    recorded in its checkpoint, unless data.tokenizer_path names one. None otherwise."""
    if config.data.tokenizer_path or not config.init_from.path:
        return None
    path = read_saved_json(config.init_from.path, _step(config), "extra").get(
        "tokenizer_path", "")
    if not path:
        return None
    logging.info("tokenizer of the init_from run: %s", path)
    return load_tokenizer(path)


def init_from_params(program: Any) -> Any:
    """The init_from checkpoint's params, sharded like `program`'s state.

    A checkpoint of a LoRA run has its adapters merged into its base weights first, so no
    trained adapter is dropped and any rank can follow. Params the model has and the (merged)
    checkpoint lacks start from a fresh params-only init (seed `config.seed`)."""
    c = program.config
    path, step = c.init_from.path, _step(c)
    flat = traverse_util.flatten_dict(program.abstract_params, sep="/")
    saved = saved_param_names(path, step)
    saved_adapters = {name for name in saved if name.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    base = {k: v for k, v in flat.items() if k in saved and k not in saved_adapters}
    # QLoRA: the checkpoint's float weights are read as such and quantized on device.
    float_base = {k: _float_abstract(v, program.model_cfg.weight_dtype) for k, v in base.items()}
    if saved_adapters:
        restored = _merged_lora_params(program, step, saved_adapters, float_base)
    else:
        restored = restore_params(path, step, traverse_util.unflatten_dict(float_base, sep="/"))
    if float_base != base:
        restored = _quantized_like(program, restored, traverse_util.unflatten_dict(base, sep="/"))
    logging.info("params from %s (step %s)", path, "newest" if step is None else step)
    fresh_names = sorted(name for name in flat if name not in base)
    if not fresh_names:
        return restored
    logging.info("params not in %s start fresh: %s", path, fresh_names)
    out = traverse_util.flatten_dict(program.init_params(jax.random.key(c.seed)), sep="/")
    out.update(traverse_util.flatten_dict(restored, sep="/"))
    return traverse_util.unflatten_dict(out, sep="/")


def _float_abstract(leaf: Any, dtype: Any) -> jax.ShapeDtypeStruct:
    """The float weight a quantized (QArray) abstract param is made from; others as they are."""
    if not isinstance(leaf, qwix.QArray):
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


def _merged_lora_params(program: Any, step: int | None, saved_adapters: set[str],
                        base: dict[str, jax.ShapeDtypeStruct]) -> Any:
    """The `base` params of a LoRA run's checkpoint with its adapters folded in,
    W + (alpha / r) A B, sharded like `base` (this run's abstract params, by '/'-name).

    The adapters are read at the shapes of the checkpoint's own rank and targets (the rank and
    alpha of its saved config, the targets from the saved names) and merged on device."""
    path = program.config.init_from.path
    saved_lora = read_saved_json(path, step, "config")["model"]["lora"]
    rank, alpha = int(saved_lora["rank"]), float(saved_lora["alpha"])
    targets = tuple(sorted({name.rsplit("/", 1)[-1][:-len(lora.SUFFIX_A)]
                            for name in saved_adapters if name.endswith(lora.SUFFIX_A)}))
    if rank <= 0:
        raise ValueError(f"init_from.path {path}: the checkpoint holds LoRA adapters but its "
                         f"saved config has model.lora.rank={rank}")
    # The checkpoint's model: this run's, with the checkpoint's adapters.
    saved_model = Transformer(dataclasses.replace(
        program.model_cfg, lora_rank=rank, lora_alpha=alpha, lora_targets=targets,
        lora_dropout=0.0))
    boxed = abstract_boxed_params(saved_model, program.config.data.seq_len)
    adapter_shardings = traverse_util.flatten_dict(
        sharding.logical_shardings(boxed, program.mesh), sep="/")
    adapter_shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
    missing = sorted(saved_adapters - adapter_shapes.keys())
    if missing:
        raise ValueError(f"init_from.path {path}: adapters {missing[:4]} do not belong to this "
                         "run's model (a different architecture)")
    wanted = dict(base)
    wanted.update({name: jax.ShapeDtypeStruct(adapter_shapes[name].shape,
                                              adapter_shapes[name].dtype,
                                              sharding=adapter_shardings[name])
                   for name in saved_adapters})
    params = restore_params(path, step, traverse_util.unflatten_dict(wanted, sep="/"))
    out_shardings = traverse_util.unflatten_dict(
        {k: v.sharding for k, v in base.items()}, sep="/")
    with sharding.activate(program.mesh):
        merged = jax.jit(functools.partial(lora.merge, rank=rank, alpha=alpha),
                         out_shardings=out_shardings)(params)
    logging.info("init_from %s: merged its LoRA adapters (rank %d, alpha %g, %s) into the base "
                 "weights; this run's own adapters, if any, start fresh", path, rank, alpha,
                 "/".join(targets))
    return merged
