"""The tiny pretraining run that the evaluation and generation tests train their checkpoints
with: a model small enough to train in seconds on CPU, checkpointed at its last step."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from jaxlm.run.config import base_config


def tiny_run_config(tmp: Path, *, num_layers: int = 2, seq_len: int = 32, steps: int = 2,
                    tensorboard: bool = False) -> ml_collections.ConfigDict:
    """A `steps`-step pretraining config (data cached under `tmp`) with no periodic eval or
    samples, a 4-batch evaluation at the end, logging every step and one checkpoint at the
    end."""
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = num_layers, 32, 64
    c.model.num_heads, c.model.num_kv_heads = 2, 1
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = seq_len, 400, 60
    c.data.cache_dir = str(tmp / "cache")
    c.train.global_batch_size, c.train.steps, c.eval.every_steps = 8, steps, 0
    # The final evaluation reads 4 batches, not the default 32k tokens (128 batches here).
    c.eval.tokens = 4 * 8 * seq_len
    c.log.peak_flops = 1e11  # MFU against a fixed number: no start-up measurement
    c.optim.warmup_steps = 1
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, tensorboard, 1
    c.checkpoint.every_steps = steps
    return c
