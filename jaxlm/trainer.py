"""The training loop shared by every stage: set up, init, step, evaluate, sample, log.

It knows a stage only through `jaxlm.stages.get_stage(config.stage)`: the stage's jitted step
functions and its data. Each piece (mesh, tokenizer, model, state, steps) is built by a function
of its own so tests can use them alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from jaxlm import config as config_lib
from jaxlm import hardware, scaling, sharding
from jaxlm.checkpoint import (
    Checkpointer,
    read_saved_json,
    restore_params,
    saved_param_names,
)
from jaxlm.data.pipeline import load_or_train_tokenizer
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.metrics import MetricsWriter, is_remote, progress_line
from jaxlm.models import ModelConfig, Transformer, lora
from jaxlm.optim import learning_rate_schedule, make_optimizer, state_bytes, train_only
from jaxlm.sampling import make_greedy_sampler
from jaxlm.stages import get_stage
from jaxlm.train_state import (
    TrainState,
    abstract_boxed_params,
    abstract_state,
    create_from_params,
    init_sharded_state,
    state_shardings,
)


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    tokenizer: Any
    model_cfg: ModelConfig
    model: Transformer
    stage: Any
    cache_dir: str
    # Extra keyword arguments of the stage's make_data (e.g. a precomputed reference table).
    data_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The eval batches (host arrays), kept by the first `evaluate` when they fit in
    # EVAL_CACHE_BYTES: later evaluations reuse them instead of rebuilding the eval iterator.
    eval_batches: list[dict[str, np.ndarray]] | None = None


# Eval batches are the same at every evaluation; up to this many bytes of them stay on the host
# after the first one, so later evaluations skip re-reading (and, for the chat stages,
# re-tokenising) the held-out data and restarting the iterator's workers.
EVAL_CACHE_BYTES = 256 * 2**20


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Validates the config, builds the mesh, the tokenizer and the model (no params yet)."""
    config_lib.validate(config)
    mesh_shape = config_lib.check_devices(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(mesh_shape)
    # Corpus and tokenizer cache: next to the run, or a local directory when the workdir is
    # an object store (sentencepiece and the corpus builder need local files).
    cache_dir = config.data.cache_dir or (
        os.path.join(os.path.expanduser("~"), ".cache", "jaxlm") if is_remote(workdir)
        else os.path.join(workdir, "cache"))
    tokenizer = _init_from_tokenizer(config) or load_or_train_tokenizer(config.data, cache_dir)
    if config.model.vocab_size and tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"config key model.vocab_size: {config.model.vocab_size} is smaller than "
                         f"the tokenizer's {tokenizer.vocab_size} ids ({tokenizer.path})")
    model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
    config = config_lib.resolve_steps(config, model_cfg)  # a token budget becomes train.steps
    if model_cfg.padded_vocab_size != model_cfg.vocab_size:
        logging.info("vocab %d padded to %d (a multiple of %d) for TPU/GPU-friendly matmuls; "
                     "padded logits are masked", model_cfg.vocab_size,
                     model_cfg.padded_vocab_size, model_cfg.vocab_multiple)
    logging.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(),
                 jax.devices()[0].platform)
    if (pipeline_line := config_lib.pipeline_summary(config)) is not None:
        logging.info(pipeline_line)
    return Setup(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                 model_cfg=model_cfg, model=Transformer(model_cfg),
                 stage=get_stage(config.stage), cache_dir=cache_dir)


def _init_from_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """A run that starts from another run's params (init_from) uses that run's tokenizer,
    recorded in its checkpoint, unless data.tokenizer_path names one."""
    if config.data.tokenizer_path or not config.init_from.path:
        return None
    step = None if config.init_from.step < 0 else config.init_from.step
    path = read_saved_json(config.init_from.path, step, "extra").get("tokenizer_path", "")
    if not path:
        return None
    logging.info("tokenizer of the init_from run: %s", path)
    return load_tokenizer(path)


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
    """Mean held-out loss over train.eval_steps batches (the same batches every time)."""
    cached = s.eval_batches
    it = iter(cached) if cached is not None else _iterator(s, "eval")
    keep: list[dict[str, np.ndarray]] | None = [] if cached is None else None
    kept_bytes = 0
    totals: dict[str, float] = {}
    try:
        for _ in range(s.config.train.eval_steps):
            batch = next(it)
            if keep is not None:
                batch = {k: np.array(v) for k, v in batch.items()}  # own copies
                kept_bytes += sum(v.nbytes for v in batch.values())
                if kept_bytes <= EVAL_CACHE_BYTES:
                    keep.append(batch)
                else:
                    keep = None
            sums = jax.device_get(eval_fn(params, sharding.global_batch(batch, s.mesh)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finally:
        if cached is None:
            _close(it)
    if keep is not None:
        s.eval_batches = keep
    if hasattr(s.stage, "eval_metrics"):  # a stage whose eval sums are not token losses
        return s.stage.eval_metrics(totals)
    n = max(totals.get("num_tokens", 0.0), 1.0)
    loss = totals.get("nll_sum", 0.0) / n
    return {"eval_loss": loss, "eval_perplexity": float(jax.numpy.exp(loss)),
            "eval_accuracy": totals.get("correct", 0.0) / n}


def _frozen_params(s: Setup, tx: optax.GradientTransformation) -> Any:
    """The init_from params, frozen, when the stage asks for them (`reference_mode`).

    "jit": returned, for the steps' third argument. "precompute": the stage's
    `reference_step` runs over its `reference_batches` once per split, the results become
    tables in s.data_kwargs["reference"] (passed to make_data), and the params are dropped.
    """
    mode = getattr(s.stage, "reference_mode", lambda _: "none")(s.config)
    if mode == "none":
        return None
    c = s.config
    if not c.init_from.path:
        raise ValueError(f"config key init_from.path: stage {c.stage} with a reference model "
                         "needs the checkpoint to start from (its params are the reference)")
    shardings = state_shardings(s.model, tx, s.mesh, c.data.seq_len)
    params = _init_from_params(s, tx, shardings)
    if mode == "jit":
        return params
    step_fn = functools.partial(s.stage.reference_step, model=s.model)
    tables = {}
    with sharding.activate(s.mesh):
        # Values and pair ids of the whole global batch, on every process.
        jitted = jax.jit(lambda p, b: (step_fn(p, b), b["pair_id"]),
                         out_shardings=sharding.replicated(s.mesh))
        for split in ("train", "eval"):
            if split == "eval" and not (c.train.eval_every and c.train.eval_steps):
                continue
            rows: dict[int, Any] = {}
            for local in s.stage.reference_batches(
                    c, s.tokenizer, split=split, batch_size=c.train.global_batch_size,
                    process_index=jax.process_index(), process_count=jax.process_count()):
                values, ids = jax.device_get(jitted(params, sharding.global_batch(local, s.mesh)))
                rows.update((int(i), v) for i, v in zip(ids, values) if i >= 0)
            tables[split] = np.stack([rows[i] for i in range(len(rows))])
            logging.info("reference log-probs precomputed for %d %s examples", len(rows), split)
    s.data_kwargs["reference"] = tables
    return None


def _checkpointer(c: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
    directory = workdir.rstrip("/") + "/checkpoints" if is_remote(workdir) else \
        os.path.join(workdir, "checkpoints")
    return Checkpointer(directory, save_every=c.checkpoint.every_steps,
                        keep_last=c.checkpoint.keep_last, keep_every=c.checkpoint.keep_every,
                        async_save=c.checkpoint.async_save)


def initial_state(s: Setup, tx: optax.GradientTransformation, ckpt: Checkpointer,
                  train_iter: Any) -> tuple[TrainState, TrainState]:
    """Resumes from the newest checkpoint (state + data position) when there is one, else
    starts from `init_from` params or a fresh init. Returns (state, its shardings)."""
    c, seq_len = s.config, s.config.data.seq_len
    shardings = state_shardings(s.model, tx, s.mesh, seq_len)
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(latest, abstract_state(s.model, tx, shardings, seq_len),
                             data_iterator=train_iter,
                             shared_data_position=c.data.process_sharding == "rows")
        logging.info("resumed from %s at step %d", ckpt.directory, latest)
        return state, shardings
    if c.init_from.path:
        params = _init_from_params(s, tx, shardings)
        logging.info("params from %s (step %s); optimizer starts fresh", c.init_from.path,
                     "newest" if c.init_from.step < 0 else c.init_from.step)
        return create_from_params(params, tx, shardings), shardings
    state, _ = init_sharded_state(s.model, tx, s.mesh, jax.random.key(c.seed), seq_len)
    return state, shardings


def _init_from_params(s: Setup, tx: optax.GradientTransformation, shardings: TrainState) -> Any:
    """The init_from checkpoint's params, sharded like this run's. A checkpoint of a LoRA run
    has its adapters merged into its base weights first (`_merged_lora_params`), so no trained
    adapter is dropped and any rank can follow. Params the model has and the (merged)
    checkpoint lacks (this run's LoRA adapters, a reward head) start from their fresh init."""
    c = s.config
    abstract = abstract_state(s.model, tx, shardings, c.data.seq_len).params
    step = None if c.init_from.step < 0 else c.init_from.step
    saved = saved_param_names(c.init_from.path, step)
    saved_adapters = {name for name in saved if name.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    flat = traverse_util.flatten_dict(abstract, sep="/")
    base = {k: v for k, v in flat.items() if k in saved and k not in saved_adapters}
    if saved_adapters:
        restored = _merged_lora_params(s, step, saved_adapters, base)
    elif len(base) == len(flat):
        return restore_params(c.init_from.path, step, abstract)
    else:
        restored = restore_params(c.init_from.path, step,
                                  traverse_util.unflatten_dict(base, sep="/"))
    fresh_names = sorted(name for name in flat if name not in base)
    if not fresh_names:
        return restored
    logging.info("params not in %s start fresh: %s", c.init_from.path, fresh_names)
    fresh, _ = init_sharded_state(s.model, tx, s.mesh, jax.random.key(c.seed), c.data.seq_len)
    out = traverse_util.flatten_dict(fresh.params, sep="/")
    out.update(traverse_util.flatten_dict(restored, sep="/"))
    return traverse_util.unflatten_dict(out, sep="/")


def _merged_lora_params(s: Setup, step: int | None, saved_adapters: set[str],
                        base: dict[str, jax.ShapeDtypeStruct]) -> Any:
    """The `base` params of a LoRA run's checkpoint with its adapters folded in,
    W + (alpha / r) A B, sharded like `base` (this run's abstract params, by '/'-name).

    The adapters are read at the shapes of the checkpoint's own rank and targets (the rank and
    alpha of its saved config, the targets from the saved names) and merged on device."""
    path = s.config.init_from.path
    saved_lora = read_saved_json(path, step, "config")["model"]["lora"]
    rank, alpha = int(saved_lora["rank"]), float(saved_lora["alpha"])
    targets = tuple(sorted({name.rsplit("/", 1)[-1][:-len(lora.SUFFIX_A)]
                            for name in saved_adapters if name.endswith(lora.SUFFIX_A)}))
    if rank <= 0:
        raise ValueError(f"init_from.path {path}: the checkpoint holds LoRA adapters but its "
                         f"saved config has model.lora.rank={rank}")
    # The checkpoint's model: this run's, with the checkpoint's adapters.
    saved_model = Transformer(dataclasses.replace(
        s.model_cfg, lora_rank=rank, lora_alpha=alpha, lora_targets=targets, lora_dropout=0.0))
    boxed = abstract_boxed_params(saved_model, s.config.data.seq_len)
    adapter_shardings = traverse_util.flatten_dict(
        sharding.logical_shardings(boxed, s.mesh), sep="/")
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
    with sharding.activate(s.mesh):
        merged = jax.jit(functools.partial(lora.merge, rank=rank, alpha=alpha),
                         out_shardings=out_shardings)(params)
    logging.info("init_from %s: merged its LoRA adapters (rank %d, alpha %g, %s) into the base "
                 "weights; this run's own adapters, if any, start fresh", path, rank, alpha,
                 "/".join(targets))
    return merged


def _log_lora(s: Setup, tx: optax.GradientTransformation, full_tx: optax.GradientTransformation
              ) -> None:
    params = nn.meta.unbox(abstract_boxed_params(s.model, s.config.data.seq_len))
    n = lora.count(params)
    used, full = state_bytes(tx, params), state_bytes(full_tx, params)
    logging.info("LoRA rank %d: %s of %s params trainable (%.3f%%); optimizer state %.2f MB "
                 "instead of %.2f MB (%.2f MB saved)", s.config.model.lora.rank,
                 f"{n['trainable']:,}", f"{n['total']:,}", 100 * n["trainable"] / n["total"],
                 used / 2**20, full / 2**20, (full - used) / 2**20)


class _Preemption:
    """Turns SIGTERM (what Cloud TPU, SLURM and Kubernetes send before stopping a job) into a
    flag the loop checks after each step: finish the step, save, exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its checkpoints); returns the last logged
    metrics."""
    s = setup(config, workdir)
    c = s.config
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main, tensorboard=c.log.tensorboard)
    total_steps = c.train.steps
    schedule = learning_rate_schedule(c.optim, total_steps)
    tx = make_optimizer(c.optim, total_steps)
    if c.model.lora.rank:  # only the adapters train; the rest has no optimizer state
        tx, full_tx = train_only(tx, lora.trainable_mask), tx
        _log_lora(s, tx, full_tx)
    ckpt = _checkpointer(c, workdir)
    # Frozen params some stages (dpo) read: passed to their steps as a third argument, or
    # turned into per-example tables handed to their data before training starts.
    frozen = _frozen_params(s, tx)
    train_iter = _iterator(s, "train")
    state, shardings = initial_state(s, tx, ckpt, train_iter)
    params_count = scaling.count_params(s.model_cfg)
    logging.info("%s | params %s (non-embedding %s)", config_lib.describe(c),
                 f"{params_count['total']:,}", f"{params_count['non_embedding']:,}")

    train_fn, eval_fn = s.stage.make_steps(c, s.model, tx, schedule)
    replicated = sharding.replicated(s.mesh)
    step = int(jax.device_get(state.step))
    batch = sharding.global_batch(next(train_iter), s.mesh) if step < total_steps else None
    # Per-array batch shardings: stages may carry [B], [B, L] or [B, 2, L] arrays.
    batch_sh = (sharding.batch_sharding(s.mesh) if batch is None else
                {k: v.sharding for k, v in batch.items()})
    frozen_args, frozen_sh = ((frozen,), (shardings.params,)) if frozen is not None else ((), ())
    with sharding.activate(s.mesh):
        t0 = time.perf_counter()
        jitted_train = jax.jit(train_fn, in_shardings=(shardings, batch_sh, *frozen_sh),
                               out_shardings=(shardings, replicated), donate_argnums=0)
        if batch is not None:
            jitted_train = jitted_train.lower(state, batch, *frozen_args).compile()
            logging.info("train step compiled in %.1fs", time.perf_counter() - t0)
        jitted_eval = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sh, *frozen_sh),
                              out_shardings=replicated)
    train_step = lambda st, b: jitted_train(st, b, *frozen_args)
    eval_step = lambda p, b: jitted_eval(p, b, *frozen_args)

    # Pair stages (dpo, reward) carry SEQUENCES_PER_ROW = 2 sequences per batch row; a frozen
    # reference evaluated inside the step (dpo.reference="jit") adds one forward pass (a third
    # of the training FLOPs).
    seqs_per_row = getattr(s.stage, "SEQUENCES_PER_ROW", 1)
    tokens_per_step = config_lib.tokens_per_step(c) * seqs_per_row
    flops_per_step = scaling.flops_per_step(s.model_cfg, c.data.seq_len,
                                            c.train.global_batch_size * seqs_per_row)
    if frozen_args:
        flops_per_step += flops_per_step / 3
    peak, peak_note = (c.log.peak_flops, "from log.peak_flops") if c.log.peak_flops else \
        hardware.peak_flops_per_device(jax.devices()[0], c.model.compute_dtype)
    logging.info("MFU against %.3g FLOP/s per device (%s) x %d devices; %.3g FLOPs per step",
                 peak, peak_note, jax.device_count(), flops_per_step)
    sampler = make_greedy_sampler(s.model, min(s.model_cfg.max_seq_len,
                                               len(s.tokenizer.encode(c.log.sample_prompt))
                                               + c.log.sample_tokens))
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
        row["tokens_per_sec"] = row["steps_per_sec"] * tokens_per_step
        row["mfu"] = hardware.mfu(flops_per_step, elapsed / window_steps,
                                  jax.device_count(), peak)
        row["tokens_seen"] = step_done * tokens_per_step
        eta = (total_steps - step_done) / max(row["steps_per_sec"], 1e-9)
        if is_main:
            logging.info(progress_line(step_done, total_steps, row, eta))
        writer.write(step_done, row)
        last = row
        window_start, window_step0 = now, step_done

    preemption = _Preemption()
    previous = None
    try:
        while step < total_steps:
            state, metrics = train_step(state, batch)
            step += 1
            # Read back the previous step's metrics only after dispatching this one, so the
            # device never waits on the host.
            if previous is not None:
                _check_finite(previous, step - 1, c.train.max_nonfinite)
            previous = metrics
            if pending is not None:
                report(*pending)
                pending = None
            if step % c.log.every_steps == 0 or step == total_steps:
                pending = (step, metrics)
            # Save before the iterator moves on, so the saved position is "after `step`
            # batches" and a resumed run draws exactly the batches this run would have.
            if ckpt.should_save(step, total_steps) or preemption.requested:
                _check_finite(metrics, step, c.train.max_nonfinite)
                ckpt.save(step, state, data_iterator=train_iter, config=c, extra=extra)
            if preemption.requested:
                logging.warning("SIGTERM: saved step %d; exiting so the job can be "
                                "rescheduled", step)
                break
            if step < total_steps:
                batch = sharding.global_batch(next(train_iter), s.mesh)
            end_or_eval = step == total_steps or (c.train.eval_every and
                                                  step % c.train.eval_every == 0)
            if end_or_eval or (c.log.sample_every and step % c.log.sample_every == 0):
                if pending is not None:
                    report(*pending)
                    pending = None
                _eval_and_sample(s, state, step, eval_step, sampler, writer, end_or_eval)
                window_start, window_step0 = time.perf_counter(), step
        if previous is not None:
            _check_finite(previous, step, c.train.max_nonfinite)
        if pending is not None:
            report(*pending)
    finally:
        preemption.restore()
        ckpt.close()  # waits for the last asynchronous save
        _close(train_iter)
        writer.close()
    return last


def _check_finite(metrics: dict[str, Any], step: int, max_in_a_row: int) -> None:
    """Warns about a skipped (NaN/Inf) step; stops the run after `max_in_a_row` of them."""
    in_a_row = int(jax.device_get(metrics["nonfinite"]))
    if not in_a_row:
        return
    logging.warning("step %d: loss or gradient norm is NaN/Inf; update skipped (%d in a row)",
                    step, in_a_row)
    if in_a_row >= max_in_a_row:
        raise FloatingPointError(
            f"{in_a_row} steps in a row (up to step {step}) had a NaN/Inf loss or gradient norm "
            f"(train.max_nonfinite={max_in_a_row}); stopping. The parameters are those of the "
            "last finite step. Lower optim.learning_rate, check the data, or raise "
            "train.max_nonfinite.")


def _eval_and_sample(s: Setup, state: TrainState, step: int, eval_step: Any, sampler: Any,
                     writer: MetricsWriter, do_eval: bool) -> None:
    c = s.config
    with sharding.activate(s.mesh):
        if do_eval and c.train.eval_steps:
            row = evaluate(s, eval_step, state.params)
            logging.info("eval at step %d | %s", step, " | ".join(
                f"{k.removeprefix('eval_')} {v:.4g}" for k, v in row.items()))
            writer.write(step, row)
        if c.log.sample_every and (step % c.log.sample_every == 0 or step == c.train.steps):
            new_ids = sampler(state.params, s.tokenizer.encode(c.log.sample_prompt))
            text = c.log.sample_prompt + s.tokenizer.decode(new_ids)
            logging.info("sample at step %d: %r", step, text)
            writer.write_text(step, "sample", text)
