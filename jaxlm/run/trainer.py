"""The training loop shared by every stage: set up, init, step, evaluate, sample, log.

It knows a stage only through its `jaxlm.stages.stage.Stage`, the `jaxlm.run.program.Program`
built for it (the state layout, the FLOP count) and the Program's step loop
(`jaxlm.stages.loop.StepLoop`): every stage, supervised, pair, distillation or RL, runs the same
loop below, which hands the step loop host batches and never asks what kind of stage it runs.
Each piece (setup, initial state, evaluation) is a function of its own so tests can use them
alone.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import cache as data_cache
from jaxlm.data.pipeline import load_or_train_tokenizer
from jaxlm.evaluation.live import LiveEval
from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import lora
from jaxlm.parallel import hardware, sharding
from jaxlm.run import config as config_lib
from jaxlm.run import config_changes, console, start_run, workdir_lock
from jaxlm.run import counters as run_counters
from jaxlm.run import program as program_lib
from jaxlm.run.checkpoint import Checkpointer, DataPositionError
from jaxlm.run.errors import ConfigError, DataError
from jaxlm.run.metrics import MetricsWriter, is_remote, progress_line
from jaxlm.run.optim import make_optimizer, state_bytes
from jaxlm.run.step_health import StepHealth
from jaxlm.run.train_state import TrainState, abstract_boxed_params
from jaxlm.scaling import flops as scaling
from jaxlm.stages.loop import StepLoop
from jaxlm.stages.stage import Stage
from jaxlm.weights import frozen as frozen_models
from jaxlm.weights import init_from as params_from
from jaxlm.weights import restore


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    tokenizer: Any
    stage: Stage
    cache_dir: str
    program: program_lib.Program | None = None
    # Extra keyword arguments of the stage's make_data (from the stage's `prepare`).
    data_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The eval batches (host arrays), kept by the first `evaluate` when they fit in
    # EVAL_CACHE_BYTES: later evaluations reuse them instead of rebuilding the eval iterator.
    eval_batches: list[dict[str, np.ndarray]] | None = None


# Eval batches are the same at every evaluation; up to this many bytes of them stay on the host
# after the first one, so later evaluations skip re-reading (and, for the chat stages,
# re-tokenising) the held-out data and restarting the iterator's workers.
EVAL_CACHE_BYTES = 256 * 2**20


def setup(config: ml_collections.ConfigDict, workdir: str, *, validated: bool = False) -> Setup:
    """Validates the config (unless the caller just did), builds the mesh, the tokenizer and
    the program (no params yet)."""
    if not validated:
        config_lib.validate(config)
    mesh_shape = config_lib.check_devices(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(mesh_shape)
    # Corpus and tokenizer cache: next to the run, or a local directory when the workdir is
    # an object store (sentencepiece and the corpus builder need local files).
    cache_dir = config.data.cache_dir or (
        data_cache.default_cache_dir() if is_remote(workdir)
        else os.path.join(workdir, "cache"))
    tokenizer = (restore.source_tokenizer(config)
                 or load_or_train_tokenizer(config.data, cache_dir))
    if config.model.vocab_size and tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"config key model.vocab_size: {config.model.vocab_size} is smaller than "
                         f"the tokenizer's {tokenizer.vocab_size} ids ({tokenizer.path})")
    program = program_lib.build(config, mesh, vocab_size=tokenizer.vocab_size)
    model_cfg = program.model_cfg
    if model_cfg.padded_vocab_size != model_cfg.vocab_size:
        logging.info("vocab %d padded to %d (a multiple of %d) for TPU/GPU-friendly matmuls; "
                     "padded logits are masked", model_cfg.vocab_size,
                     model_cfg.padded_vocab_size, model_cfg.vocab_multiple)
    logging.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(),
                 jax.devices()[0].platform)
    if (pipeline_line := config_lib.pipeline_summary(config)) is not None:
        logging.info(pipeline_line)
    return Setup(config=program.config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                 stage=program.stage, cache_dir=cache_dir, program=program)


def _iterator(s: Setup, split: str) -> Any:
    return s.stage.make_data(
        s.config, s.tokenizer, split=split,
        batch_size=s.config.train.global_batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        cache_dir=s.cache_dir, **s.data_kwargs)


def _close(iterator: Any) -> None:
    """Stops an iterator's prefetch threads / worker processes now rather than at exit."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def evaluate(s: Setup, eval_fn: Any, params: Any) -> dict[str, float]:
    """The stage's eval metrics over its `eval_batches` held-out batches (the same batches every
    time).
    eval_fn(params, host_batch) -> sums: the step loop's `eval`."""
    cached = s.eval_batches
    it = iter(cached) if cached is not None else _iterator(s, "eval")
    keep: list[dict[str, np.ndarray]] | None = [] if cached is None else None
    kept_bytes = 0
    totals: dict[str, float] = {}
    try:
        for _ in range(s.stage.eval_batches(s.config)):
            batch = next(it)
            if keep is not None:
                batch = {k: np.array(v) for k, v in batch.items()}  # own copies
                kept_bytes += sum(v.nbytes for v in batch.values())
                if kept_bytes <= EVAL_CACHE_BYTES:
                    keep.append(batch)
                else:
                    keep = None
            sums = jax.device_get(eval_fn(params, batch))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finally:
        if cached is None:
            _close(it)
    if keep is not None:
        s.eval_batches = keep
    return s.stage.eval_metrics(totals)


def _checkpointer(c: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
    directory = workdir.rstrip("/") + "/checkpoints" if is_remote(workdir) else \
        os.path.join(workdir, "checkpoints")
    return Checkpointer(directory, save_every=c.checkpoint.every_steps,
                        keep_last=c.checkpoint.keep_last, keep_every=c.checkpoint.keep_every,
                        async_save=c.checkpoint.async_save)


def initial_state(s: Setup, ckpt: Checkpointer, train_iter: Any,
                  start_params: Any = None) -> TrainState:
    """Resumes from the newest checkpoint (state + data position) when there is one, else
    starts from the `init_from` params (`start_params` if already restored) or a fresh init."""
    c, program = s.config, s.program
    try:
        restored = ckpt.restore_newest(program.abstract_state, data_iterator=train_iter,
                                       shared_data_position=c.data.process_sharding == "rows")
    except DataPositionError as e:  # the data config changed: name what, move nothing
        try:
            saved = ckpt.read_json(e.step, "config")
        except (FileNotFoundError, ValueError):
            saved = {}
        raise config_changes.data_position_error(saved, c, step=e.step,
                                                 directory=ckpt.directory, cause=e.cause) from e
    if restored is not None:
        logging.info("resumed from %s at step %d", ckpt.directory, restored[0])
        return restored[1]
    if c.init_from.path:
        params = start_params if start_params is not None else \
            params_from.init_from_params(program)
        logging.info("optimizer starts fresh")
        return program.state_from_params(params)
    return program.init_state(jax.random.key(c.seed))


# The key of the step loop's host state (`StepLoop.host_state`) in each checkpoint's `extra`.
HOST_STATE = "host_state"


def restore_host_state(loop: StepLoop, ckpt: Checkpointer, step: int) -> None:
    """Hands a run resumed at `step` the host state saved with that checkpoint (taken after
    the step), so the loop continues as the uninterrupted run's. A checkpoint written before
    loops saved their state leaves the loop as its config starts it."""
    if step == 0:
        return
    try:
        extra = ckpt.read_json(step, "extra")
    except (FileNotFoundError, ValueError):
        extra = {}
    if HOST_STATE in extra:
        loop.load_host_state(extra[HOST_STATE])
    elif loop.host_state():
        logging.warning("checkpoint %d saved no host state: the loop's %s start from the "
                        "config", step, ", ".join(sorted(loop.host_state())))


def _reference(s: Setup, start_params: Any) -> Any:
    """The frozen reference params of a stage that has one, sharded like the policy, restored
    from init_from once (shared with the starting params when the run starts from them).
    A "precompute" stage turns them into data (s.data_kwargs) here and None is returned."""
    mode = s.stage.reference_mode(s.config)
    if mode == "none":
        return None
    if not s.config.init_from.path:
        raise ConfigError(f"config key init_from.path: stage {s.config.stage} with a reference "
                         "model needs the checkpoint to start from (its params are the "
                         "reference)")
    params = start_params if start_params is not None else \
        params_from.init_from_params(s.program)
    if mode == "precompute":
        s.data_kwargs.update(s.stage.prepare(s.program, s.tokenizer, params))
        return None
    # The train step donates the state; the reference must not share its buffers.
    return params_from.frozen_copy(s.program, params) if start_params is not None else params


def _log_lora(s: Setup) -> None:
    c, program = s.config, s.program
    params = nn.meta.unbox(abstract_boxed_params(program.model, c.data.seq_len))
    n = lora.count(params)
    full_tx = make_optimizer(c.optim, c.train.steps, schedule=program.lr_schedule)
    used, full = state_bytes(program.tx, params), state_bytes(full_tx, params)
    logging.info("LoRA rank %d: %s of %s params trainable (%.3f%%); optimizer state %.2f MB "
                 "instead of %.2f MB (%.2f MB saved)", c.model.lora.rank,
                 f"{n['trainable']:,}", f"{n['total']:,}", 100 * n["trainable"] / n["total"],
                 used / 2**20, full / 2**20, (full - used) / 2**20)


class _Terminated(BaseException):
    """SIGTERM during start-up. A BaseException, so that no `except Exception` on the way
    (e.g. the one that tells a damaged checkpoint) takes it for a failure of its own."""


class _Preemption:
    """Turns SIGTERM (what Cloud TPU, SLURM and Kubernetes send before stopping a job) into a
    flag the loop checks after each step: finish the step, save, exit 0. During start-up
    (`raising`), when there is nothing to save yet, it raises `_Terminated` instead, so the run
    unwinds at once, releasing the workdir lock."""

    def __init__(self) -> None:
        self.requested = False
        self.raising = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def start_up(self) -> None:
        """From now until `training`, SIGTERM raises _Terminated (at once if it came already)."""
        self.raising = True
        if self.requested:
            raise _Terminated

    def training(self) -> None:
        """From now on SIGTERM only sets the flag (a request during start-up is kept)."""
        self.raising = False

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True
        if self.raising:
            self.raising = False
            raise _Terminated


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its checkpoints); returns the last logged
    metrics. The run owns the workdir meanwhile: a second run on it refuses to start.
    SIGTERM before the first step ends it at once (no metrics, lock released). A run whose
    init_from.config names its starting run trains that one first, in <workdir>/init."""
    config = start_run.with_start_path(config, workdir)
    config_lib.validate(config)
    is_main = jax.process_index() == 0
    with _Preemption() as preemption, workdir_lock.hold(workdir, enabled=is_main), \
            console.quiet(workdir if is_main else None):
        try:
            preemption.start_up()
            start_run.train_start(config, workdir, run)
            return _run(config, workdir, preemption)
        except _Terminated:
            preemption.training()
            logging.warning("SIGTERM during start-up: exiting before the first step (nothing "
                            "to save)")
            return {}


def _next_batch(train_iter: Any, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step + 1`; a data pipeline that ends (every pipeline repeats its
    data forever, so only an empty one does) is a one-line error."""
    try:
        return next(train_iter)
    except StopIteration:
        raise DataError(f"the training data yields no batch for step {step + 1}: no training "
                        "documents are left (all empty, all held out, or all duplicates of "
                        "the held-out files); check data.paths, data.eval_paths or the stage's "
                        "paths") from None


def _run(config: ml_collections.ConfigDict, workdir: str,
         preemption: _Preemption) -> dict[str, float]:
    s = setup(config, workdir, validated=True)  # `run` validated it before taking the lock
    c, program = s.config, s.program
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main, tensorboard=c.log.tensorboard)
    if c.model.lora.rank:
        _log_lora(s)
    ckpt = _checkpointer(c, workdir)
    train_iter = None
    finished = False
    try:
        # The init_from params are restored once: they start the state (unless resuming) and
        # are the frozen reference of a stage that has one (its steps' third argument, or data).
        start_params = None
        if ckpt.latest_step() is None and c.init_from.path:
            start_params = params_from.init_from_params(program)
        reference = _reference(s, start_params)
        # The stage's frozen models (a distillation teacher): restored once, never donated.
        frozen = frozen_models.restore(program.frozen, s.tokenizer) if program.frozen else None
        train_iter = _iterator(s, "train")
        state = initial_state(s, ckpt, train_iter, start_params)
        del start_params
        last = _train(s, writer, ckpt, preemption, train_iter, state, reference, frozen)
        finished = True
        return last
    finally:
        # Waits for the last asynchronous save; a failed one is raised unless another error
        # is already on its way out.
        try:
            ckpt.close(raise_errors=finished)
        finally:
            if train_iter is not None:
                _close(train_iter)
            writer.close()


def _train(s: Setup, writer: MetricsWriter, ckpt: Checkpointer, preemption: _Preemption,
           train_iter: Any, state: TrainState, reference: Any, frozen: Any) -> dict[str, float]:
    """The step loop, from the restored (or fresh) `state` to train.steps."""
    c, program = s.config, s.program
    is_main = jax.process_index() == 0
    total_steps = c.train.steps
    params_count = scaling.count_params(program.model_cfg)
    logging.info("%s | params %s (non-embedding %s)", config_lib.describe(c),
                 f"{params_count['total']:,}", f"{params_count['non_embedding']:,}")

    step = int(jax.device_get(state.step))
    if step == 0 and ckpt.moved_aside:
        # Starting over because no checkpoint could be read: the old rows stay, in a file of
        # their own.
        kept = f"metrics.before-restart-{int(time.time())}.jsonl"
        moved = writer.set_aside(kept)
        if moved:
            logging.warning("metrics.jsonl: its %d rows, of the run whose checkpoints cannot "
                            "be restored, are kept in %s", moved, kept)
    dropped = writer.truncate_after(step)
    if dropped:
        logging.info("metrics.jsonl: dropped %d rows after the resumed step %d", dropped, step)
    config_lib.warn_schedule(c, total_steps)
    loop = program.make_loop(s.tokenizer, reference, frozen)  # every stage's step
    restore_host_state(loop, ckpt, step)
    if step < total_steps:
        loop.compile()
    host_batch = _next_batch(train_iter, step) if step < total_steps else None

    tokens_per_step, flops_per_step = program.tokens_per_step, program.flops_per_step
    counter = run_counters.resumed_counter(ckpt, step, tokens_per_step, c)
    health = StepHealth(c.train.max_nonfinite)
    peak, peak_note = (c.log.peak_flops, "from log.peak_flops") if c.log.peak_flops else \
        hardware.peak_flops_per_device(jax.devices()[0], c.model.compute_dtype,
                                       cache_dir=s.cache_dir)
    logging.info("MFU against %.3g FLOP/s per device (%s) x %d devices; %.3g FLOPs per step",
                 peak, peak_note, jax.device_count(), flops_per_step)
    sampler = Sampler(program.model_cfg, None, mesh=s.mesh,
                      pad_id=max(getattr(s.tokenizer, "pad_id", 0), 0))
    live_eval = LiveEval.maybe(s)  # config.eval.tasks on the live params
    extra = {"tokenizer_path": s.tokenizer.path,
             "tokenizer_sha256": getattr(s.tokenizer, "sha256", "")}

    pending: tuple[int, Any] | None = None
    # Throughput is measured over completed steps: from window_step0 (done at window_start) to
    # the step being reported, whose metrics the host has just waited for.
    window_start, window_step0 = time.perf_counter(), step
    last: dict[str, float] = {}

    def report(step_done: int, metrics: dict[str, Any]) -> None:
        nonlocal window_start, window_step0, last
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        elapsed = max(now - window_start, 1e-9)
        window_steps = max(step_done - window_step0, 1)
        row["steps_per_sec"] = window_steps / elapsed
        # The same for every stage: the Program's tokens and FLOPs of a whole step.
        row["tokens_per_sec"] = row["steps_per_sec"] * tokens_per_step
        row["mfu"] = hardware.mfu(flops_per_step, elapsed / window_steps, jax.device_count(),
                                  peak)
        row["tokens_seen"] = counter.tokens_seen(step_done)
        eta = (total_steps - step_done) / max(row["steps_per_sec"], 1e-9)
        if is_main:
            logging.info(progress_line(step_done, total_steps, row, eta))
        writer.write(step_done, row)
        last = row
        window_start, window_step0 = now, step_done

    preemption.training()  # from here SIGTERM finishes the step and saves
    previous = None
    if step == 0 < total_steps and s.stage.eval_at_start:
        _eval_and_sample(s, state, 0, loop, sampler, writer, True)
        window_start = time.perf_counter()
    while step < total_steps:
        state, metrics = loop.train(state, host_batch)
        step += 1
        # Read back the previous step's metrics only after dispatching this one, so the
        # device never waits on the host.
        if previous is not None:
            health.check(previous, step - 1)
        previous = metrics
        if pending is not None:
            report(*pending)
            pending = None
        ckpt.poll()  # logs a finished background save, or raises its failure
        if step % c.log.every_steps == 0 or step == total_steps:
            pending = (step, metrics)
        # Save before the iterator moves on, so the saved position is "after `step`
        # batches" and a resumed run draws exactly the batches this run would have.
        if ckpt.should_save(step, total_steps) or preemption.requested:
            health.check(metrics, step)
            # The loop's host state after this step's update.
            saved = {**extra, "tokens_seen": counter.tokens_seen(step),
                     HOST_STATE: loop.host_state()}
            ckpt.save(step, state, data_iterator=train_iter, config=c, extra=saved)
        if preemption.requested:
            logging.warning("SIGTERM: saved step %d; exiting so the job can be "
                            "rescheduled", step)
            break
        if step < total_steps:
            host_batch = _next_batch(train_iter, step)
        end_or_eval = step == total_steps or (c.eval.every_steps and
                                              step % c.eval.every_steps == 0)
        tasks_due = live_eval is not None and live_eval.due(step, total_steps)
        if (end_or_eval or tasks_due
                or (c.log.sample_every and step % c.log.sample_every == 0)):
            if pending is not None:
                report(*pending)
                pending = None
            _eval_and_sample(s, state, step, loop, sampler, writer, end_or_eval)
            if tasks_due:
                writer.write(step, live_eval.metrics(live_eval.run(state.params, step)))
            window_start, window_step0 = time.perf_counter(), step
    if previous is not None:
        health.check(previous, step)
    if pending is not None:
        report(*pending)
    return last


def _eval_and_sample(s: Setup, state: TrainState, step: int, loop: StepLoop, sampler: Sampler,
                     writer: MetricsWriter, do_eval: bool) -> None:
    c = s.config
    with sharding.activate(s.mesh):
        if do_eval and s.stage.eval_batches(c):
            row = evaluate(s, loop.eval, state.params)
            logging.info("eval at step %d | %s", step, " | ".join(
                f"{k.removeprefix('eval_')} {v:.4g}" for k, v in row.items()))
            writer.write(step, row)
            if samples := loop.samples():
                writer.write_text(step, "samples", "\n\n".join(samples))
    if (s.stage.generates_text and c.log.sample_every
            and (step % c.log.sample_every == 0 or step == c.train.steps)):
        text = sample_text(s, sampler, state.params)
        logging.info("sample at step %d: %r", step, text)
        writer.write_text(step, "sample", text)


def sample_text(s: Setup, sampler: Sampler, params: Any) -> str:
    """log.sample_prompt and its greedy continuation of up to log.sample_tokens tokens, from
    the KV-cache decoder on the training mesh (the params as they are sharded for training)."""
    c = s.config
    prompt = s.tokenizer.encode(c.log.sample_prompt) or [0]
    prompt = prompt[: s.program.model_cfg.max_seq_len - 1]
    new = min(c.log.sample_tokens, s.program.model_cfg.max_seq_len - len(prompt))
    sampler.params = params
    try:
        completion = sampler.generate([Request(prompt, max_new_tokens=new)])[0]
    finally:
        sampler.params = None
    return c.log.sample_prompt + s.tokenizer.decode(completion.tokens)
