"""What a training stage is: the one interface the program builder and the trainer know.

A stage module (pretrain, sft, dpo, reward, ...) defines `STAGE = Stage(...)` and is listed once in
`jaxlm.stages.STAGE_MODULES`. Everything stage-specific is reached through these fields; the
trainer never names a stage or reads a stage's batch keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

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


def no_reference(config: Config) -> str:
    del config
    return "none"


def no_frozen_models(config: Config) -> dict[str, tuple[str, int | None]]:
    del config
    return {}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One way of training the model.

    Attributes:
      name: the value of `config.stage` that selects it.
      make_steps: (config, model, tx, lr_schedule) -> (train_step, eval_step), pure and un-jitted:
        train_step(state, batch[, reference_params]) -> (state, metrics) and
        eval_step(params, batch[, reference_params]) -> sums; the reference params are passed
        only when `reference_mode(config) == "jit"`.
      make_data: (config, tokenizer, *, split, batch_size, process_index, process_count,
        cache_dir, **prepared) -> iterator of host batches with exactly `batch_fields`.
      batch_fields: config -> the per-row shape and dtype of every batch array.
      section: the config section the stage owns (None: none), with its defaults and checks
        (`default_section() -> ConfigDict`, `check_config(config)` raising ValueError that names
        the key).
      sequences_per_row: model sequences per batch row (2 for chosen/rejected pairs; a function
        of the config for RL groups): tokens/s and FLOPs count every one.
      vocab_head: whether the step runs the [D, V] output head (a reward model does not).
      reward_head: the model is built with a scalar score head.
      eval_metrics: summed eval sums over batches -> logged metrics.
      reference_mode: config -> "none", "jit" (a frozen copy of the init_from params is the
        steps' third argument) or "precompute" (`prepare` turns it into data before training).
      prepare: (program, tokenizer, reference_params) -> keyword arguments of make_data, run once
        before training when reference_mode is "precompute".
      generates_text: whether logged samples make sense for the model.
      make_host: (program, tokenizer) -> a host loop, for stages whose step needs Python between
        jitted pieces (RL: generate, score text on the host, update). The trainer then hands it
        the host-local batches instead of calling the jitted steps itself:
        `host.train(state, host_batch, reference) -> (state, metrics)` (float metrics; its own
        tokens_per_sec / mfu win over the trainer's), `host.eval(params, host_batch, reference)
        -> sums` (summed over eval batches, then `eval_metrics`), and `host.samples`, texts
        written to TensorBoard at each evaluation. A host that carries values from step to
        step returns them from `host.host_state()` (a JSON-serialisable dict, saved with each
        checkpoint) and takes them back in `host.load_host_state(dict)` on resume.
      updates_per_step: config -> optimizer updates per trainer step (the learning-rate
        schedule spans train.steps times this many).
      frozen_models: config -> {name: (checkpoint directory, step or None for the newest)} of
        models the steps read but never train (a distillation teacher), each of the shape its
        checkpoint's saved config gives (jaxlm/weights/frozen.py). When there are any,
        make_steps also gets `frozen={name: FrozenModel}` and both steps take one more
        argument after the batch (and reference): {name: params}, sharded on the run's mesh.
    """

    name: str
    make_steps: Callable[..., tuple[Callable[..., Any], Callable[..., Any]]]
    make_data: Callable[..., Iterator[dict[str, np.ndarray]]]
    batch_fields: Callable[[Config], BatchFields]
    section: str | None = None
    default_section: Callable[[], Config] | None = None
    check_config: Callable[[Config], None] | None = None
    sequences_per_row: int | Callable[[Config], int] = 1
    vocab_head: bool = True
    reward_head: bool = False
    eval_metrics: Callable[[dict[str, float]], dict[str, float]] = token_eval_metrics
    reference_mode: Callable[[Config], str] = no_reference
    prepare: Callable[..., dict[str, Any]] | None = None
    generates_text: bool = True
    make_host: Callable[[Any, Any], Any] | None = None
    updates_per_step: Callable[[Config], int] = lambda config: 1

    frozen_models: Callable[[Config], dict[str, tuple[str, int | None]]] = no_frozen_models

    def sequences(self, config: Config) -> int:
        """Model sequences per batch row under `config`."""
        n = self.sequences_per_row
        return n(config) if callable(n) else n
