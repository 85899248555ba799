"""What the pair stages (dpo, reward) share: batches of [B, 2, L] rows, chosen then rejected,
run through the model as one [2B, L] batch."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm.stages.stage import BatchFields, token_fields

Batch = dict[str, jax.Array]
# Each batch row holds a pair; tokens/s and FLOPs count both sequences.
SEQUENCES_PER_ROW = 2


def flatten(batch: Batch, fields: tuple[str, ...]) -> dict[str, jax.Array]:
    """`fields` of a [B, 2, L] pair batch as [2B, L] arrays (pair i -> rows 2i, 2i + 1)."""
    b, two, length = batch["inputs"].shape
    return {k: batch[k].reshape(b * two, length) for k in fields}


def apply(params: Any, flat: dict[str, jax.Array], *, model: nn.Module,
          rng: jax.Array | None = None, return_hidden: bool = False) -> tuple[Any, Any]:
    """The model on flattened pair rows: (its output, its sown intermediates (MoE router
    stats)). `rng` feeds dropout (LoRA) in training steps; return_hidden as in `Transformer`
    (the output is then (hidden, head), for `jaxlm.losses.cross_entropy.token_logps`)."""
    return model.apply(
        {"params": params}, flat["inputs"], positions_BxL=flat["positions"],
        segment_ids_BxL=flat["segment_ids"], return_hidden=return_hidden,
        mutable=["intermediates"], rngs=None if rng is None else {"dropout": rng})


def batch_fields(config: Any) -> BatchFields:
    """[2, L] token fields per pair row, and the pair's index in its split (pad rows: -1)."""
    return {**token_fields(config.data.seq_len, pair=True), "pair_id": ((), np.int32)}
