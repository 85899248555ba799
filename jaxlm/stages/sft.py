"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of conversations.

The batch has the pretraining layout (inputs, targets, segment_ids, positions, loss_mask, each
[B, L]), built by jaxlm/data/sft.py: several conversations packed per row as separate
segments, loss_mask 1 only on assistant tokens (or on all tokens, sft.loss_on="all"). The loss
is the mean over those tokens, so a batch's weight is its number of trained tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.run.train_state import TrainState
from jaxlm.stages import pretrain
from jaxlm.stages.pretrain import batch_fields, pretrain_step
from jaxlm.stages.settings import SFT
from jaxlm.stages.stage import Stage, section_heldout_key

Batch = dict[str, jax.Array]


def sft_step(state: TrainState, batch: Batch, **settings: Any
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean loss over the trained tokens of `batch`: the pretraining
    step (same keyword settings) plus two packing metrics. Its z_loss metric is dropped
    (optim.z_loss still applies)."""
    new_state, metrics = pretrain_step(state, batch, **settings)
    real_tokens = jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))
    metrics.pop("z_loss")
    # Share of the non-padding tokens that are trained (assistant) targets.
    metrics["trained_fraction"] = metrics["num_tokens"] / jnp.maximum(real_tokens, 1.0)
    # Share of the rows' slots holding tokens (the rest is padding left by packing).
    metrics["fill"] = real_tokens / batch["segment_ids"].size
    return new_state, metrics


# The pretraining stage's settings and eval step (the same token loss) with sft_step.
make_steps = functools.partial(pretrain.make_steps, step_fn=sft_step)


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str) -> Any:
    """Packed conversation batches (jaxlm/data/sft.py)."""
    del cache_dir
    from jaxlm.data.sft import make_sft_iterator
    return make_sft_iterator(config, tokenizer, split=split, batch_size=batch_size,
                             process_index=process_index, process_count=process_count)


STAGE = Stage(name="sft", make_steps=make_steps, make_data=make_data, batch_fields=batch_fields,
              sections=(SFT,),
              heldout_key=section_heldout_key('sft'))
