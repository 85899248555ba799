"""Loading a trained model for inference: its config, tokenizer and params from a checkpoint."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.inference.sampler import param_shardings
from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run import checkpoint
from jaxlm.run import config as config_lib
from jaxlm.run.train_state import abstract_boxed_params

# --kv_cache values of generate and eval -> ModelConfig.kv_cache_dtype ("" keeps the run's)
KV_CACHE_FLAG = {"compute": "", "int8": "int8"}


def with_kv_cache(model_cfg: ModelConfig, kv_cache: str) -> ModelConfig:
    """The model config with the KV cache a `--kv_cache` flag asks for: "" keeps the run's
    model.kv_cache_dtype, "compute" stores k and v in the compute dtype, "int8" as int8."""
    if kv_cache and kv_cache not in KV_CACHE_FLAG:
        raise ValueError(f"--kv_cache={kv_cache!r} is not one of {list(KV_CACHE_FLAG)} (or "
                         "empty: the run's model.kv_cache_dtype)")
    if not kv_cache:
        return model_cfg
    return dataclasses.replace(model_cfg, kv_cache_dtype=KV_CACHE_FLAG[kv_cache])


@dataclasses.dataclass
class LoadedModel:
    config: ml_collections.ConfigDict  # the run config saved with the checkpoint
    model_cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer
    step: int


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints` for a run's workdir; the directory itself if it holds steps."""
    nested = os.path.join(workdir, "checkpoints")
    return nested if epath.Path(nested).is_dir() else workdir


def read_json_items(directory: str, step: int) -> dict[str, dict[str, Any]]:
    """The `config` and `extra` items of a checkpoint step, read without touching the run."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           step_name_format=checkpoint._name_format())
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in checkpoint.JSON_ITEMS:
        for arg in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add(name, arg, ocp.handlers.JsonCheckpointHandler())
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as mngr:
        present = [n for n in checkpoint.JSON_ITEMS
                   if epath.Path(os.path.join(checkpoint._step_dir(directory, step), n)).is_dir()]
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{n: ocp.args.JsonRestore() for n in present}))
        return {n: restored[n] for n in present}


def _tokenizer(config: ml_collections.ConfigDict, extra: dict[str, Any]) -> Tokenizer:
    path = extra.get("tokenizer_path") or config.data.tokenizer_path
    if not path or not epath.Path(path).exists():
        raise FileNotFoundError(f"the checkpoint's tokenizer {path!r} does not exist; copy it "
                                "back or re-run training's tokenizer step")
    tokenizer = load_tokenizer(path)
    want = extra.get("tokenizer_sha256")
    if want and tokenizer.sha256 != want:
        raise ValueError(f"tokenizer {path} has changed since the checkpoint was written "
                         f"(sha256 {tokenizer.sha256[:12]} != {want[:12]})")
    return tokenizer


def read_run(workdir: str, step: int | None = None
             ) -> tuple[str, int, ml_collections.ConfigDict, dict[str, Any]]:
    """(checkpoint directory, step, saved run config, saved `extra` item) of the newest (or
    `step`) complete checkpoint of a run's workdir or of a checkpoint directory."""
    directory = checkpoint_dir(os.path.abspath(workdir) if "://" not in workdir else workdir)
    steps = checkpoint.complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {workdir}")
    step = steps[-1] if step is None else step
    items = read_json_items(directory, step)
    if checkpoint.CONFIG not in items:
        raise FileNotFoundError(f"checkpoint {step} in {directory} has no saved config")
    return (directory, step, ml_collections.ConfigDict(items[checkpoint.CONFIG]),
            items.get(checkpoint.EXTRA, {}))


def restore_sharded_params(directory: str, step: int, model_cfg: ModelConfig,
                           mesh: Mesh | None) -> tuple[Any, Mesh]:
    """(params of checkpoint `step` laid out over `mesh`, that mesh); with no mesh, every device
    on the data axis, i.e. params replicated."""
    if mesh is None:
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    shapes = nn.meta.unbox(abstract_boxed_params(Transformer(model_cfg), 1))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, param_shardings(model_cfg, mesh))
    return checkpoint.restore_params(directory, step, abstract), mesh


def load_model(workdir: str, step: int | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """The newest (or `step`) checkpoint of a run: params only, sharded over `mesh` (default:
    every device on the data axis, i.e. params replicated)."""
    directory, step, config, extra = read_run(workdir, step)
    tokenizer = _tokenizer(config, extra)
    model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
    params, _ = restore_sharded_params(directory, step, model_cfg, mesh)
    return LoadedModel(config, model_cfg, params, tokenizer, step)
