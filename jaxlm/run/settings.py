"""The run loop's config sections: `train` (length, batch, pipeline schedule, health),
`checkpoint` and `log`, with their defaults and checks.
"""

from __future__ import annotations

import ml_collections

from jaxlm.models.pipeline import bubble_fraction
from jaxlm.run import errors
from jaxlm.run.section import Section
from jaxlm.scaling import flops as scaling


def default_train_config() -> ml_collections.ConfigDict:
    """The `train` section with its defaults."""
    t = ml_collections.ConfigDict()
    # Sequences per optimizer step, over all devices and processes.
    t.global_batch_size = 16
    # Optimizer steps of the run; 0 = from the token budget below (see docs/scaling.md).
    t.steps = 1000
    # Token budget of the run (0: unset); needs train.steps = 0. Steps = ceil(tokens / tokens
    # per step), resolved in one place: `resolve_steps`. The LR schedule follows those steps.
    t.tokens = 0
    # Token budget as tokens per model parameter (0: unset, which is 20, Chinchilla's
    # compute-optimal ratio, when train.steps and train.tokens are 0 too); needs train.steps = 0.
    t.tokens_per_param = 0.0
    # What "parameter" means in tokens_per_param and in sweep results (docs/scaling.md):
    # "chinchilla" (Hoffmann et al.'s Table A9 count), "total" or "non_embedding" (as built),
    # "kaplan" (Kaplan et al.'s attention + MLP matrices).
    t.param_convention = "chinchilla"
    # A step whose loss or gradient norm is NaN/Inf is skipped (params unchanged); the run stops
    # with an error after this many such steps in a row.
    t.max_nonfinite = 10
    # Pipeline microbatches (mesh.pipeline > 1 only): each batch (each grad_accum_steps chunk)
    # is cut into this many microbatches that flow through the stages together; the idle
    # "bubble" fraction is (pipeline - 1) / (pipeline_microbatches + pipeline - 1).
    t.pipeline_microbatches = 1
    # Circular pipeline schedule (mesh.pipeline > 1 only): each stage holds this many chunks V of
    # num_layers / (pipeline * V) layers (chunk c on stage c mod pipeline) and the microbatches
    # go round the stages V times, so the bubble shrinks to (P - 1) / (V * M + P - 1) for
    # M = pipeline_microbatches >= P (required). 1 = GPipe. Must divide num_layers / pipeline.
    # Checkpoints keep the stacked layout; the step transposes the block params (and their
    # gradients) across `pipeline` instead, about one parameter-sized send per device per step.
    t.pipeline_repeats = 1
    return t


def check_budget(t: ml_collections.ConfigDict) -> None:
    """A run has one length: train.steps, train.tokens or train.tokens_per_param."""
    for key in ("steps", "tokens", "tokens_per_param"):
        if t[key] < 0:
            _fail(f"train.{key}", f"must be >= 0, got {t[key]}")
    if t.param_convention not in scaling.PARAM_CONVENTIONS:
        _fail("train.param_convention", f"{t.param_convention!r} is not one of "
              f"{scaling.PARAM_CONVENTIONS}")
    given = [key for key in ("steps", "tokens", "tokens_per_param") if t[key] > 0]
    if len(given) > 1:
        _fail(f"train.{given[1]}", f"{t[given[1]]} conflicts with train.{given[0]}="
              f"{t[given[0]]}: a run has one length; set the other to 0")


def _check_pipeline(config: ml_collections.ConfigDict) -> None:
    stages, m = config.mesh.pipeline, config.train.pipeline_microbatches
    layers = config.model.num_layers
    if stages == -1:
        _fail("mesh.pipeline", "-1 is not supported here; give the number of pipeline stages")
    if m < 1:
        _fail("train.pipeline_microbatches", f"must be >= 1, got {m}")
    if stages == 1 and m > 1:
        _fail("train.pipeline_microbatches", f"{m} pipeline microbatches need mesh.pipeline > "
              "1; for sequential microbatches (gradient accumulation) use optim.grad_accum_steps")
    if stages > 1 and not config.model.scan_layers:
        _fail("model.scan_layers", f"mesh.pipeline={stages} needs scan_layers=True (the "
              "stages are slices of the stacked layers)")
    if stages > 1 and layers % stages:
        _fail("mesh.pipeline", f"{stages} pipeline stages do not divide model.num_layers="
              f"{layers}: every stage holds num_layers / mesh.pipeline layers")
    repeats = config.train.pipeline_repeats
    if repeats < 1:
        _fail("train.pipeline_repeats", f"must be >= 1, got {repeats}")
    if repeats > 1 and stages == 1:
        _fail("train.pipeline_repeats", f"{repeats} circular repeats need mesh.pipeline > 1")
    if repeats > 1 and (layers // stages) % repeats:
        _fail("train.pipeline_repeats", f"{repeats} does not divide the {layers // stages} "
              f"layers of a stage (model.num_layers={layers} / mesh.pipeline={stages})")
    if repeats > 1 and m < stages:
        _fail("train.pipeline_repeats", "the circular schedule needs "
              f"train.pipeline_microbatches >= mesh.pipeline, got {m} < {stages} (with fewer "
              "microbatches than stages it idles like GPipe); raise train.pipeline_microbatches "
              "or set pipeline_repeats=1")


def check_train(config: ml_collections.ConfigDict) -> None:
    """Raises naming the `train.*` key that is wrong (the pipeline keys against the mesh)."""
    t = config.train
    check_budget(t)
    if t.global_batch_size < 1:
        _fail("train.global_batch_size", f"must be >= 1, got {t.global_batch_size}")
    if t.max_nonfinite < 1:
        _fail("train.max_nonfinite", f"must be >= 1, got {t.max_nonfinite}")
    _check_pipeline(config)


def pipeline_summary(config: ml_collections.ConfigDict) -> str | None:
    """The startup log line of a pipelined run (None without pipelining): stages, microbatch
    sizes, schedule and its bubble fraction."""
    stages, m = config.mesh.pipeline, config.train.pipeline_microbatches
    repeats = config.train.pipeline_repeats
    if stages == 1:
        return None
    rows = config.train.global_batch_size // config.optim.grad_accum_steps // m
    bubble = bubble_fraction(stages, m, repeats)
    layers = config.model.num_layers // stages
    if repeats == 1:
        schedule = f"GPipe schedule: bubble fraction (P-1)/(M+P-1) = {bubble:.3f}"
    else:
        schedule = (f"circular schedule, {repeats} chunks of {layers // repeats} layers per "
                    f"stage: bubble fraction (P-1)/(V*M+P-1) = {bubble:.3f}")
    return (f"pipeline: {stages} stages x {layers} layers, {m} microbatches of {rows} "
            f"sequences (global), {schedule}")


def default_checkpoint_config() -> ml_collections.ConfigDict:
    """The `checkpoint` section with its defaults."""
    ck = ml_collections.ConfigDict()
    # Save every this many steps (0: only at the end / on SIGTERM). A run started on a workdir
    # that holds checkpoints resumes from the newest complete one.
    ck.every_steps = 500
    # Keep the newest this many checkpoints...
    ck.keep_last = 3
    # ...plus every checkpoint whose step is a multiple of this (0: none).
    ck.keep_every = 0
    # Write in the background while training continues.
    ck.async_save = True
    return ck


def check_checkpoint(config: ml_collections.ConfigDict) -> None:
    ck = config.checkpoint
    for key in ("every_steps", "keep_every"):
        if ck[key] < 0:
            _fail(f"checkpoint.{key}", f"must be >= 0, got {ck[key]}")
    if ck.keep_last < 1:
        _fail("checkpoint.keep_last", f"must be >= 1, got {ck.keep_last}")


def default_log_config() -> ml_collections.ConfigDict:
    """The `log` section with its defaults."""
    lg = ml_collections.ConfigDict()
    # Write metrics.jsonl / TensorBoard / the progress line every this many steps.
    lg.every_steps = 10
    # Print a greedy continuation of log.sample_prompt every this many steps (0: never).
    lg.sample_every = 200
    # The fixed prompt of logged samples. No trailing space: BPE pieces carry their leading
    # space (" foo"), so "def " ends in a lone-space piece the model has rarely seen.
    lg.sample_prompt = "def"
    # Tokens generated per sample.
    lg.sample_tokens = 32
    # Peak FLOP/s per device for MFU; 0 = from the device table, measured on CPU.
    lg.peak_flops = 0.0
    # Also write TensorBoard event files under <workdir>/tensorboard.
    lg.tensorboard = True
    return lg


def check_log(config: ml_collections.ConfigDict) -> None:
    lg = config.log
    if lg.every_steps < 1:
        _fail("log.every_steps", f"must be >= 1, got {lg.every_steps}")
    for key in ("sample_every", "sample_tokens"):
        if lg[key] < 0:
            _fail(f"log.{key}", f"must be >= 0, got {lg[key]}")
    if lg.peak_flops < 0:
        _fail("log.peak_flops", f"must be >= 0 (0 = from the device table), got {lg.peak_flops}")


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(key, msg)


TRAIN = Section("train", default_train_config, check_train)
CHECKPOINT = Section("checkpoint", default_checkpoint_config, check_checkpoint)
LOG = Section("log", default_log_config, check_log)
