"""Run configuration: the defaults of every section, validation, and derived numbers.

A config file is `get_config(arg=None)` that starts from `base_config()` and sets what differs.
`validate` runs before anything is compiled and raises one `ValueError` naming the key to fix.
Only this module turns user-facing sizes into derived ones (default head_dim, kv heads, d_ff,
per-replica batch, microbatch size).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections
from absl import logging

from jaxlm.data.chat import CHAT
from jaxlm.data.config import DATA
from jaxlm.evaluation.settings import EVAL
from jaxlm.models.config import ModelConfig
from jaxlm.models.quant.settings import QUANT, quant_spec
from jaxlm.models.settings import DERIVED_MODEL_KEYS, MODEL, model_config
from jaxlm.parallel.distributed import DISTRIBUTED
from jaxlm.parallel.settings import MESH
from jaxlm.parallel.sharding import MESH_AXES, resolve_mesh_shape
from jaxlm.run import errors
from jaxlm.run.errors import ConfigError
from jaxlm.run.optim import OPTIM
from jaxlm.run.settings import CHECKPOINT, LOG, TRAIN, check_budget, pipeline_summary
from jaxlm.scaling import flops as scaling
from jaxlm.stages import STAGE_MODULES, get_stage
from jaxlm.stages.rl.settings import PPO, RL
from jaxlm.stages.settings import DISTILL, DPO, REWARD, SFT
from jaxlm.stages.stage import token_eval_batches
from jaxlm.weights.settings import INIT_FROM

STAGES = tuple(STAGE_MODULES)


# Every section of the run config, each declared (defaults, one comment per key,
# checks) by the module that owns its concept. The core sections are checked for every run, in
# this order (the mesh and pipeline before the model they split); a stage's sections for a run of
# a stage that lists them in `Stage.sections`.
CORE_SECTIONS = (DATA, CHAT, DISTRIBUTED, EVAL, MESH, TRAIN, MODEL, QUANT, OPTIM, CHECKPOINT,
                 INIT_FROM, LOG)
STAGE_SECTIONS = (SFT, DPO, REWARD, RL, PPO, DISTILL)
SECTIONS = CORE_SECTIONS + STAGE_SECTIONS


def base_config() -> ml_collections.ConfigDict:
    """Every key a run may set, with its default. Config files override a subset."""
    c = ml_collections.ConfigDict()
    # Which stage trains: "pretrain", "sft", "dpo" or "reward" (docs/post_training.md), "grpo",
    # "ppo" or "rejection" (docs/rl.md), "distill" (docs/distillation.md); the registry is
    # jaxlm/stages/__init__.py.
    c.stage = "pretrain"
    # Seed of parameter init (data order has its own seed, data.seed).
    c.seed = 0
    for section in SECTIONS:
        c[section.name] = section.defaults()
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's argument `"k1=v1,k2=v2"` over typed defaults.

    `--config=configs/chinchilla.py:size=1018,smoke=True` reaches get_config as that string.
    Values take the type of their default; an unknown name is an error naming it.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected one of "
                             f"{', '.join(f'{k}=...' for k in defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}: {value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}: {value!r} is not a {kind.__name__}"
                                 ) from e
    return out


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`.

    How one config file builds on another: `configs/sft_tiny.py` starts from
    `load_config_file(Path(__file__).with_name("tiny.py"))` and sets what differs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"config file {path!r} does not exist; check --config",
                                      path=path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# Config keys that were renamed: old dotted name -> new one. Setting an old name (in a config
# file or as a --config.* override) is an error naming the new key, never silently ignored.
RENAMED_KEYS: dict[str, str] = {
    "train.num_microbatches": "train.pipeline_microbatches",
    # One name per idea: the KL coefficient and the reward model are the RL stages' shared keys,
    # GAE's discount and lambda PPO's own.
    "ppo.kl_coef": "rl.kl_coef",
    "ppo.reward_model": "rl.reward_model",
    "ppo.reward_model_step": "rl.reward_model_step",
    "rl.gamma": "ppo.gamma",
    "rl.lam": "ppo.lam",
    # When and on how much a run evaluates is the `eval` section's.
    "train.eval_every": "eval.every_steps",
    "train.eval_steps": "eval.tokens",
}
# What a renamed key's new name does not say.
RENAME_NOTES: dict[str, str] = {
    "train.eval_steps": "held-out tokens per evaluation, not batches; eval.examples counts "
                        "the pairs or prompts of the pair and RL stages",
}


def check_renamed_key(name: str) -> None:
    """Raises ValueError naming the new key when the dotted `name` is a renamed config key."""
    if name in RENAMED_KEYS:
        note = f" ({RENAME_NOTES[name]})" if name in RENAME_NOTES else ""
        _fail(name, f"renamed to {RENAMED_KEYS[name]}{note}")


def check_override_key(name: str) -> None:
    """Raises naming the key when a `--config.<name>` override is renamed or unknown (with the
    closest known key), before ml_collections would fail with a bare AttributeError."""
    check_renamed_key(name)
    node: Any = base_config()
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            return  # a value that is itself a dict/tuple: ml_collections checks the rest
        if part not in node:
            prefix = ".".join(parts[:i] + [""])
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            _fail(name, f"unknown key{hint}")
        node = node[part]


def _unknown_keys(config: Any, schema: Any, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            check_renamed_key(name)
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise errors.config_error(name, f"unknown key{hint}")
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {name}: must be a section, got {value!r}")
            _unknown_keys(value, expected, prefix=f"{name}.")


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(f"{key}", msg)


def validate(config: ml_collections.ConfigDict) -> None:
    """Device-independent checks of a whole run config; raises ValueError naming the key."""
    _unknown_keys(config, base_config())
    _check_finite_floats(config)
    stage = get_stage(config.stage)  # raises naming the key for an unknown stage
    for section in CORE_SECTIONS + tuple(stage.sections):
        if section.check is not None:
            section.check(config)
    _check_heldout(config, stage)


def _check_heldout(config: ml_collections.ConfigDict, stage: Any) -> None:
    """A run that evaluates has held-out data: data.eval_fraction > 0, or the held-out files
    of the stage's data (`Stage.heldout_key`); otherwise it would fail at its first
    evaluation, after training."""
    if not stage.eval_batches(config) or config.data.eval_fraction > 0:
        return
    key = stage.heldout_key(config)
    if key is not None and config[key.split(".")[0]][key.split(".")[1]]:
        return
    size = "eval.tokens" if stage.eval_batches is token_eval_batches else "eval.examples"
    _fail("data.eval_fraction", f"is 0{f' and {key} is empty' if key else ''}, so the "
          f"evaluation ({size}={config.eval[size.split('.')[1]]}) has no held-out data; set "
          f"it > 0{f', set {key}' if key else ''}, or set {size}=0")


def _check_finite_floats(config: Any, prefix: str = "") -> None:
    """Every float key is finite: NaN passes every `<= 0` check and would train silently."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite_floats(value, prefix=f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(name, f"must be a finite number, got {value}")


def warn_schedule(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Logs once when the warmup is longer than the run (the peak rate is never reached)."""
    warmup = config.optim.warmup_steps
    if warmup > total_steps:
        logging.warning("optim.warmup_steps=%d is longer than the run's %d steps: the learning "
                        "rate reaches only %.3g of optim.learning_rate=%g", warmup, total_steps,
                        total_steps / warmup, config.optim.learning_rate)


DEFAULT_TOKENS_PER_PARAM = 20.0


def resolve_steps(config: ml_collections.ConfigDict,
                  model_cfg: ModelConfig) -> ml_collections.ConfigDict:
    """The config with `train.steps` set from its token budget (a copy; unchanged if steps > 0).

    The one place where `train.tokens` / `train.tokens_per_param` become steps: tokens per
    parameter counts parameters as `train.param_convention` says (`scaling.param_count`), and
    steps = ceil(tokens / (train.global_batch_size * data.seq_len)), so a run trains on at least
    its budget.
    """
    t = config.train
    check_budget(t)
    if t.steps > 0:
        return config
    if t.tokens > 0:
        tokens = t.tokens
    else:
        per_param = t.tokens_per_param or DEFAULT_TOKENS_PER_PARAM
        tokens = per_param * scaling.param_count(model_cfg, t.param_convention)
    resolved = config.copy_and_resolve_references()
    resolved.train.steps = max(1, -(-int(tokens) // tokens_per_step(config)))
    return resolved


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  num_processes: int = 1) -> dict[str, int]:
    """Checks the mesh and batch against the devices; returns the resolved mesh shape."""
    shape = resolve_mesh_shape({a: config.mesh[a] for a in MESH_AXES}, num_devices)
    dp = shape["data"] * shape["fsdp"] * shape["expert"]
    batch = config.train.global_batch_size
    if batch % dp:
        _fail("train.global_batch_size", f"{batch} is not divisible by the data-parallel size "
              f"{dp} (mesh.data * mesh.fsdp * mesh.expert)")
    experts = config.model.moe.num_experts
    if shape["expert"] > 1 and experts % shape["expert"]:
        _fail("mesh.expert", f"{shape['expert']} does not divide model.moe.num_experts="
              f"{experts}")
    if batch % num_processes:
        _fail("train.global_batch_size", f"{batch} is not divisible by the {num_processes} "
              "processes")
    accum = config.optim.grad_accum_steps
    if (batch // dp) % accum:
        _fail("optim.grad_accum_steps", f"{accum} microbatches do not divide the per-replica "
              f"batch {batch // dp} (train.global_batch_size / data-parallel size {dp})")
    m = config.train.pipeline_microbatches
    if (batch // dp // accum) % m:
        _fail("train.pipeline_microbatches", f"{m} pipeline microbatches do not divide the "
              f"per-replica batch of one accumulation step, {batch // dp // accum} "
              f"(train.global_batch_size / data-parallel size {dp} / optim.grad_accum_steps)")
    return shape


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    return config.train.global_batch_size * config.data.seq_len


def describe(config: ml_collections.ConfigDict) -> str:
    """A short one-line summary for logs."""
    m = config.model
    return (f"stage={config.stage} d_model={m.d_model} layers={m.num_layers} heads={m.num_heads} "
            f"seq={config.data.seq_len} batch={config.train.global_batch_size} "
            f"steps={config.train.steps} tokens/step={tokens_per_step(config)} "
            f"params_dtype={m.param_dtype} compute_dtype={m.compute_dtype}")


__all__ = ["base_config", "parse_arg", "load_config_file", "validate", "check_devices",
           "model_config", "quant_spec", "describe", "tokens_per_step", "pipeline_summary",
           "resolve_steps", "check_renamed_key", "RENAMED_KEYS", "SECTIONS", "DERIVED_MODEL_KEYS",
           "ModelConfig"]
