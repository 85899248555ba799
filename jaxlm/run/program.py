"""The program builder: one place that turns a run config and a mesh into what runs.

    program = build(config, mesh, vocab_size=tokenizer.vocab_size)
    state = ...                      # restored, from init_from, or program.init_state(rng)
    loop = program.make_loop(tokenizer, reference, frozen)
    state, metrics = loop.train(state, host_batch)

The trainer, the ahead-of-time TPU fit check (`jaxlm.tools.aot`) and the throughput benchmark
(`benchmarks/train_throughput.py`) all call `build`, so what is fit-checked and benchmarked is
exactly what trains: the stage's step functions, LoRA's frozen base (no optimizer state, no
weight gradients), a frozen reference model as the steps' third argument, the stage's batch
layout, the state's logical shardings and its donation, and the stage's other jitted programs
(`Stage.make_programs`: an RL rollout with its KV cache, a reward model's scoring, DPO's
reference precompute), each with explicit shardings and abstract inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from jaxlm.models import ModelConfig, Transformer, lora
from jaxlm.models.attention import resolve_attention
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.optim import learning_rate_schedule, make_optimizer, train_only
from jaxlm.run.train_state import (
    TrainState,
    abstract_state,
    create_from_params,
    init_sharded_state,
    state_shardings,
)
from jaxlm.scaling import flops as scaling
from jaxlm.stages import get_stage
from jaxlm.stages.loop import StepLoop
from jaxlm.stages.stage import JitProgram, Stage
from jaxlm.weights import frozen as frozen_models


@dataclasses.dataclass
class Program:
    """A run's model, optimizer, state layout, batch layout and jitted programs.

    Attributes:
      config: the run config with `train.steps` resolved from its token budget.
      stage: the `Stage` of config.stage.
      tx, lr_schedule: the optimizer (LoRA: adapters only) and its schedule, built once.
      state_shardings / abstract_state: the TrainState's NamedShardings and ShapeDtypeStructs.
      abstract_batch / batch_shardings: one global batch of the train step's layout.
      uses_reference: the steps take the frozen reference params as a third argument, sharded
        like the policy's params (`reference_shardings`).
      frozen: the stage's frozen models (`Stage.frozen_models`), by name; when there are any,
        the steps take {name: params} as their last argument (`frozen_shardings`).
      train_step: jit(state, batch[, reference][, frozen]) -> (state, metrics), state donated.
      eval_step: jit(params, batch[, reference][, frozen]) -> summed eval values; None for a
        stage whose loop evaluates otherwise (RL decodes held-out prompts).
      programs: the stage's other jitted programs by name (`Stage.make_programs`: "rollout",
        "eval_rollout", "reward_score", "reference_logps"), each with its abstract arguments
        and FLOPs.
      train_step_flops: model FLOPs of one call of the train step: every sequence of every row,
        the backward work of what trains in each of its optimizer updates
        (`Stage.updates_per_step`), the reference's and frozen models' forwards and the
        policy's other forwards (`Stage.policy_forwards`), only the work done
        (`scaling.train_flops_per_token`).
      flops_per_step: model FLOPs of one trainer step, what MFU divides by: the train step
        plus every program that runs once per step (an RL rollout's prefill and decode at its
        full rl.max_new_tokens length, an upper bound when every completion stops early; a
        reward model's scoring). Programs run at evaluations or once before training are not
        counted.
      tokens_per_step: the tokens the train step trains on (every sequence of every row).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    stage: Stage
    model_cfg: ModelConfig
    model: Transformer
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    state_shardings: TrainState
    abstract_state: TrainState
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    batch_shardings: dict[str, NamedSharding]
    uses_reference: bool
    train_step: Any
    eval_step: Any
    train_step_flops: float
    flops_per_step: float
    tokens_per_step: int
    frozen: dict[str, frozen_models.FrozenModel] = dataclasses.field(default_factory=dict)
    programs: dict[str, JitProgram] = dataclasses.field(default_factory=dict)

    @property
    def frozen_shardings(self) -> dict[str, Any]:
        return {name: f.shardings for name, f in self.frozen.items()}

    def extra_args(self, reference: Any, frozen: dict[str, Any] | None) -> tuple[Any, ...]:
        """The steps' arguments after the batch: [reference params][, frozen params]."""
        return (((reference,) if self.uses_reference else ())
                + ((frozen,) if self.frozen else ()))

    @property
    def reference_shardings(self) -> Any:
        return self.state_shardings.params

    @property
    def abstract_params(self) -> Any:
        return self.abstract_state.params

    def abstract_args(self) -> tuple[Any, ...]:
        """(state, batch[, reference params][, frozen params]) as ShapeDtypeStructs: what
        `lower` takes."""
        frozen = {name: f.abstract_params for name, f in self.frozen.items()}
        return (self.abstract_state, self.abstract_batch,
                *self.extra_args(self.abstract_params, frozen))

    def lower_train(self) -> Any:
        with sharding.activate(self.mesh):
            return self.train_step.trace(*self.abstract_args()).lower()

    def lower(self, name: str) -> Any:
        """One of `programs` lowered for its abstract arguments (no data, nothing allocated)."""
        jitted = self.programs[name]
        with sharding.activate(self.mesh):
            return jitted.fn.trace(*jitted.abstract_args).lower()

    def resident(self) -> dict[str, Any]:
        """The device arrays that live for the whole run, abstract, by name: the policy's
        params, the rest of the train state (optimizer), the reference and frozen models'
        params, and what the programs hold (a reward model's params)."""
        out = {"params": self.abstract_state.params,
               "optimizer": self.abstract_state.replace(params=None)}
        if self.uses_reference:
            out["reference"] = self.abstract_params
        if self.frozen:
            out["frozen"] = {name: f.abstract_params for name, f in self.frozen.items()}
        for jitted in self.programs.values():
            out.update(jitted.holds)
        return out

    @property
    def train_reads(self) -> tuple[str, ...]:
        """The `resident` arrays among the train step's arguments."""
        return tuple(k for k in ("params", "optimizer", "reference", "frozen")
                     if k in self.resident())

    def make_loop(self, tokenizer: Any, reference: Any = None,
                  frozen: dict[str, Any] | None = None) -> StepLoop:
        """The stage's step loop (`Stage.make_loop`) around this program, with the steps' extra
        arguments (reference params, frozen models' params) bound."""
        return self.stage.make_loop(self, tokenizer, self.extra_args(reference, frozen))

    def compile_train(self) -> Any:
        """The train step compiled ahead of any data; logs the compile time."""
        t0 = time.perf_counter()
        compiled = self.lower_train().compile()
        logging.info("train step compiled in %.1fs", time.perf_counter() - t0)
        return compiled

    def init_state(self, rng: jax.Array) -> TrainState:
        """Fresh params and optimizer state, each shard written in place (abstract-first)."""
        return init_sharded_state(self.model, self.tx, self.mesh, rng, self.config.data.seq_len,
                                  self.state_shardings)[0]

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh params only (no optimizer state), sharded like the state's."""
        model, seq_len = self.model, self.config.data.seq_len
        init = lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"])
        with sharding.activate(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings.params)(rng)

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh TrainState (step 0, new optimizer state) around existing params."""
        with sharding.activate(self.mesh):
            return create_from_params(params, self.tx, self.state_shardings)


def make_tx(config: ml_collections.ConfigDict, lr_schedule: optax.Schedule,
            updates: int | None = None, stage: Stage | None = None
            ) -> optax.GradientTransformation:
    """The run's optimizer: AdamW on every leaf, or (LoRA) on the adapters only, wrapped by the
    stage's `wrap_optimizer` if it has one. updates: the run's optimizer updates (default
    train.steps)."""
    tx = make_optimizer(config.optim, updates or config.train.steps, schedule=lr_schedule)
    if config.model.lora.rank:  # only the adapters train; the rest has no optimizer state
        tx = train_only(tx, lora.trainable_mask)
    if stage is not None and stage.wrap_optimizer is not None:
        tx = stage.wrap_optimizer(config, tx)
    return tx


def abstract_batch(stage: Stage, config: ml_collections.ConfigDict, mesh: Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch of the stage's layout, rows sharded over the data-parallel axes."""
    rows = config.train.global_batch_size
    return {k: jax.ShapeDtypeStruct((rows, *shape), dtype,
                                    sharding=sharding.batch_sharding(mesh, 1 + len(shape)))
            for k, (shape, dtype) in stage.batch_fields(config).items()}


def step_flops(stage: Stage, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
               uses_reference: bool, frozen: dict[str, Any] | None = None) -> float:
    """Model FLOPs of one call of `stage`'s train step: every sequence of every row, the
    backward work of what trains in each of its optimizer updates, the reference's forward and
    the policy's other forwards (`Stage.policy_forwards`) once, the vocabulary head only where
    the stage runs it, and one forward of each frozen model (a third of its training FLOPs)."""
    seq_len = config.data.seq_len
    per_token = functools.partial(
        scaling.train_flops_per_token, model_cfg, seq_len,
        frozen_base=bool(config.model.lora.rank), vocab_head=stage.vocab_head)
    train, forward = per_token(), per_token(reference_forwards=1) - per_token()
    # Every optimizer update trains; the reference, the policy's other forwards and the frozen
    # models run once per step.
    per_step = (train * stage.updates_per_step(config)
                + forward * (int(uses_reference) + stage.policy_forwards(config)))
    per_step += sum(scaling.train_flops_per_token(f.model_cfg, seq_len) / 3
                    for f in (frozen or {}).values())
    return per_step * seq_len * config.train.global_batch_size * stage.sequences(config)


def build(config: ml_collections.ConfigDict, mesh: Mesh, *, vocab_size: int | None = None,
          platform: str | None = None) -> Program:
    """The run's Program on `mesh`. vocab_size: the tokenizer's (used when model.vocab_size is
    0). platform: the backend the step is compiled for when it is not this machine's ("tpu" for
    the ahead-of-time fit check), which decides what attention="auto" means."""
    stage = get_stage(config.stage)
    model_cfg = config_lib.model_config(config, vocab_size)
    if platform is not None:
        model_cfg = dataclasses.replace(
            model_cfg, attention=resolve_attention(model_cfg.attention, platform,
                                                 model_cfg.attn_logit_softcap,
                                                 config.data.seq_len))
    config = config_lib.resolve_steps(config, model_cfg)  # a token budget becomes train.steps
    model = Transformer(model_cfg)
    updates = config.train.steps * stage.updates_per_step(config)  # optimizer updates
    lr_schedule = learning_rate_schedule(config.optim, updates)
    tx = make_tx(config, lr_schedule, updates, stage)
    seq_len = config.data.seq_len
    shardings = state_shardings(model, tx, mesh, seq_len)
    abstract = abstract_state(model, tx, shardings, seq_len)
    batch = abstract_batch(stage, config, mesh)
    batch_sh = {k: v.sharding for k, v in batch.items()}
    uses_reference = stage.reference_mode(config) == "jit"
    frozen = frozen_models.build(stage.frozen_models(config), config, mesh, model_cfg.vocab_size)
    reference_sh = ((shardings.params,) if uses_reference else ()) + (
        ({name: f.shardings for name, f in frozen.items()},) if frozen else ())
    train_fn, eval_fn = stage.make_steps(config, model, tx, lr_schedule,
                                         **({"frozen": frozen} if frozen else {}))
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(train_fn, in_shardings=(shardings, batch_sh, *reference_sh),
                         out_shardings=(shardings, replicated), donate_argnums=0)
    eval_step = None if eval_fn is None else jax.jit(
        eval_fn, in_shardings=(shardings.params, batch_sh, *reference_sh),
        out_shardings=replicated)
    train_flops = step_flops(stage, config, model_cfg, uses_reference, frozen)
    program = Program(
        config=config, mesh=mesh, stage=stage, model_cfg=model_cfg, model=model, tx=tx,
        lr_schedule=lr_schedule, state_shardings=shardings, abstract_state=abstract,
        abstract_batch=batch, batch_shardings=batch_sh, uses_reference=uses_reference,
        train_step=train_step, eval_step=eval_step, train_step_flops=train_flops,
        flops_per_step=train_flops,
        tokens_per_step=(config_lib.tokens_per_step(config) * stage.sequences(config)),
        frozen=frozen)
    # The stage's other programs see the finished layout (params shardings, mesh, model).
    programs = stage.make_programs(program)
    return dataclasses.replace(
        program, programs=programs,
        flops_per_step=train_flops + sum(p.flops for p in programs.values() if p.per_step))
