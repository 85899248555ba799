"""What a training stage is: the one interface the program builder and the trainer know.

A stage module (pretrain, sft, dpo, reward, grpo, ...) defines `STAGE = Stage(...)` and is listed
once in `jaxlm.stages.STAGE_MODULES`. Everything stage-specific is reached through these fields;
the trainer never names a stage, reads a stage's batch keys or asks what kind of stage it runs.

Importing this module pulls in neither grain nor JAX (the config schema reads `Section`s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from jaxlm.run.section import Section

if TYPE_CHECKING:
    from jaxlm.run.program import Program
    from jaxlm.stages.loop import StepLoop

Config = ml_collections.ConfigDict
# Field name -> (shape of one batch row, dtype); the batch holds [global_batch, *shape] arrays.
BatchFields = dict[str, tuple[tuple[int, ...], Any]]


def token_fields(seq_len: int, pair: bool = False) -> BatchFields:
    """The next-token layout of the data pipelines: [L] per row ([2, L] for a pair row)."""
    row = (2, seq_len) if pair else (seq_len,)
    fields: BatchFields = {k: (row, np.int32)
                           for k in ("inputs", "targets", "segment_ids", "positions")}
    fields["loss_mask"] = (row, np.float32)
    return fields


def token_eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Mean held-out loss, perplexity and accuracy from summed token losses."""
    n = max(totals.get("num_tokens", 0.0), 1.0)
    loss = totals.get("nll_sum", 0.0) / n
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": totals.get("correct", 0.0) / n}


def token_eval_batches(config: Config) -> int:
    """Global batches per evaluation of a token stage: eval.tokens held-out tokens in rows of
    data.seq_len (0: the stage does not evaluate)."""
    tokens_per_batch = config.train.global_batch_size * config.data.seq_len
    return -(-config.eval.tokens // tokens_per_batch)


def example_eval_batches(config: Config) -> int:
    """Global batches per evaluation of a pair or RL stage: eval.examples held-out pairs or
    prompts, train.global_batch_size a batch (0: the stage does not evaluate)."""
    return -(-config.eval.examples // config.train.global_batch_size)


def no_reference(config: Config) -> str:
    del config
    return "none"


def no_frozen_models(config: Config) -> dict[str, tuple[str, int | None]]:
    del config
    return {}


def corpus_heldout_key(config: Config) -> str | None:
    """data.eval_paths for a corpus of files; None for the stdlib corpus and mixtures, whose
    held-out documents come only from data.eval_fraction."""
    return "data.eval_paths" if config.data.source in ("files", "arrayrecord") else None


def section_heldout_key(section: str) -> Callable[[Config], str | None]:
    """`<section>.eval_paths`: the held-out files of a stage that reads its own section's
    paths (sft, dpo, reward)."""
    return lambda config: f"{section}.eval_paths"


def no_programs(program: Program) -> dict[str, JitProgram]:
    del program
    return {}


def jit_step_loop(program: Program, tokenizer: Any, step_args: tuple[Any, ...]) -> StepLoop:
    """The default loop: the Program's jitted train and eval steps on global batches."""
    del tokenizer
    from jaxlm.stages.loop import JitStepLoop  # JAX only once a run is built

    return JitStepLoop(program, step_args)


@dataclasses.dataclass(frozen=True)
class JitProgram:
    """A jitted program of a run beside its train and eval steps (an RL rollout, a reward
    model's scoring, DPO's reference precompute). `program.build` makes them through
    `Stage.make_programs`, so the ahead-of-time fit check compiles them and the Program's
    FLOP count includes the ones that run in every step.

    Attributes:
      fn: the `jax.jit`-ed function, with explicit in and out shardings.
      abstract_args: its positional arguments as ShapeDtypeStructs carrying their shardings
        (what `Program.lower` traces it with).
      flops: model FLOPs of one call on arguments of these shapes.
      per_step: it runs once in every train step; False: at evaluations or once before training.
      reads: the run-long device arrays among its arguments, by their `Program.resident` names
        (`params`, `reference`, ...); the fit check adds the others to its memory.
      holds: run-long arrays it brings itself, by name (a reward model's params), abstract.
      temporaries: named large values one call creates (the rollout's KV cache), global bytes.
    """

    fn: Callable[..., Any]
    abstract_args: tuple[Any, ...]
    flops: float
    per_step: bool
    reads: tuple[str, ...] = ()
    holds: dict[str, Any] = dataclasses.field(default_factory=dict)
    temporaries: dict[str, int] = dataclasses.field(default_factory=dict)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One way of training the model.

    Attributes:
      name: the value of `config.stage` that selects it.
      make_steps: (config, model, tx, lr_schedule) -> (train_step, eval_step), pure and un-jitted:
        train_step(state, batch[, reference_params]) -> (state, metrics) and
        eval_step(params, batch[, reference_params]) -> sums, or None for a stage whose loop
        evaluates otherwise (RL decodes held-out prompts); the reference params are passed
        only when `reference_mode(config) == "jit"`.
      make_data: (config, tokenizer, *, split, batch_size, process_index, process_count,
        cache_dir, **prepared) -> iterator of host batches (this process's rows).
      batch_fields: config -> the per-row shape and dtype of every array of the train step's
        batch.
      sections: the config sections the stage reads (`Section`s, each declared once by its
        owning module): their defaults are part of the schema, their checks run for the stage.
      sequences_per_row: model sequences per batch row (2 for chosen/rejected pairs; a function
        of the config for RL groups): tokens/s and FLOPs count every one.
      vocab_head: whether the step runs the [D, V] output head (a reward model does not).
      reward_head: the model is built with a scalar score head.
      eval_metrics: summed eval sums over batches -> logged metrics.
      eval_batches: config -> held-out global batches per evaluation, from eval.tokens (token
        stages) or eval.examples (pair and RL stages).
      reference_mode: config -> "none", "jit" (a frozen copy of the init_from params is the
        steps' third argument) or "precompute" (`prepare` turns it into data before training).
      prepare: (program, tokenizer, reference_params) -> keyword arguments of make_data, run once
        before training when reference_mode is "precompute" (with a program of
        `make_programs`).
      generates_text: whether logged samples make sense for the model.
      make_programs: program -> {name: JitProgram}, the stage's jitted programs besides its
        steps (an RL rollout, a reward model's scoring, a reference precompute), built by
        `program.build` with the steps and held by the Program.
      make_loop: (program, tokenizer, step_args) -> the `StepLoop` the trainer calls every step
        (step_args: the steps' arguments after the batch, `Program.extra_args`). The default
        runs the jitted steps on global batches; an RL stage's generates, scores on the host
        and updates.
      updates_per_step: config -> optimizer updates per trainer step (the learning-rate
        schedule spans train.steps times this many).
      policy_forwards: config -> forward passes of the policy per step besides its updates'
        (PPO's values of the rollout policy); FLOPs count them.
      heldout_key: config -> the config key naming held-out files that replace the
        data.eval_fraction holdout (data.eval_paths, sft.eval_paths, ...), or None when held-out
        data comes only from data.eval_fraction; `validate` refuses an evaluating run that has
        neither.
      eval_at_start: a new run evaluates before its first step too (RL: the held-out score
        of the policy it starts from, what its gain is measured against).
      wrap_optimizer: (config, tx) -> the optimizer the stage trains with, around the run's
        (ppo: a larger step on its value head), or None for the run's as it is.
      frozen_models: config -> {name: (checkpoint directory, step or None for the newest)} of
        models the steps read but never train (a distillation teacher), each of the shape its
        checkpoint's saved config gives (jaxlm/weights/frozen.py). When there are any,
        make_steps also gets `frozen={name: FrozenModel}` and both steps take one more
        argument after the batch (and reference): {name: params}, sharded on the run's mesh.
    """

    name: str
    make_steps: Callable[..., tuple[Callable[..., Any], Callable[..., Any] | None]]
    make_data: Callable[..., Iterator[dict[str, np.ndarray]]]
    batch_fields: Callable[[Config], BatchFields]
    sections: tuple[Section, ...] = ()
    sequences_per_row: int | Callable[[Config], int] = 1
    vocab_head: bool = True
    reward_head: bool = False
    eval_metrics: Callable[[dict[str, float]], dict[str, float]] = token_eval_metrics
    eval_batches: Callable[[Config], int] = token_eval_batches
    reference_mode: Callable[[Config], str] = no_reference
    prepare: Callable[..., dict[str, Any]] | None = None
    generates_text: bool = True
    make_programs: Callable[[Program], dict[str, JitProgram]] = no_programs
    make_loop: Callable[[Program, Any, tuple[Any, ...]], StepLoop] = jit_step_loop
    updates_per_step: Callable[[Config], int] = lambda config: 1
    policy_forwards: Callable[[Config], int] = lambda config: 0
    frozen_models: Callable[[Config], dict[str, tuple[str, int | None]]] = no_frozen_models
    heldout_key: Callable[[Config], str | None] = corpus_heldout_key
    eval_at_start: bool = False
    wrap_optimizer: Callable[[Config, Any], Any] | None = None

    def sequences(self, config: Config) -> int:
        """Model sequences per batch row under `config`."""
        n = self.sequences_per_row
        return n(config) if callable(n) else n
