"""Per-token log-probabilities of given texts: what evaluation and parity checks build on.

Two ways in:

* `token_logprobs(model, params, tokens, valid)`: one right-padded sequence per row.
* `packed_logprobs(model, params, rows, greedy=...)`: several sequences per row, each its own
  segment with positions from 0, as `pack` lays them out. A token attends only to its own
  segment, so a sequence scores the same packed or alone; the rows are full, so no forward
  work goes to padding. `jaxlm.evaluation.engine` scores every request this way.

`pack` plans the rows: sequences longest first, each batch `num_rows` rows of the power-of-two
length (`length_bucket`) that holds its longest sequence, every row filled first-fit with
the longest sequences that still fit. A set of requests therefore compiles one program per
row length it reaches (a handful), and the rows are nearly full whatever the mix of lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.losses.cross_entropy import token_logps, token_logps_and_hits

# The shortest row of a packed batch.
MIN_BUCKET = 16


def token_logprobs(model: nn.Module, params: Any, tokens_BxL: jax.Array,
                   valid_BxL: jax.Array) -> jax.Array:
    """log p(token[t+1] | tokens[..t]) for right-padded rows, [B, L-1]; 0 where t+1 is padding.

    One full forward pass (no cache); padding is its own segment, so it never affects the real
    tokens. The log-probs come from the hidden states chunk by chunk (`token_logps`), so long
    texts never hold [B, L, V] logits.
    """
    hidden_BxLxD, head_VxD = model.apply({"params": params}, tokens_BxL,
                                         segment_ids_BxL=valid_BxL.astype(jnp.int32),
                                         return_hidden=True)
    logp_BxL = token_logps(hidden_BxLxD[:, :-1], head_VxD, tokens_BxL[:, 1:],
                           vocab_size=model.cfg.vocab_size,
                           logit_softcap=model.cfg.final_logit_softcap)
    return jnp.where(valid_BxL[:, 1:], logp_BxL, 0.0)


def packed_logprobs(model: nn.Module, params: Any, inputs_BxL: jax.Array,
                    targets_BxL: jax.Array, positions_BxL: jax.Array,
                    segment_ids_BxL: jax.Array, *, greedy: bool
                    ) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets) [B, L] of packed rows (0 where segment_ids is 0, padding) and, with
    `greedy`, whether each target is the model's argmax there [B, L] (else None)."""
    hidden_BxLxD, head_VxD = model.apply({"params": params}, inputs_BxL,
                                         positions_BxL=positions_BxL,
                                         segment_ids_BxL=segment_ids_BxL, return_hidden=True)
    kwargs = dict(vocab_size=model.cfg.vocab_size, logit_softcap=model.cfg.final_logit_softcap)
    hits_BxL = None
    if greedy:
        logp_BxL, hits_BxL = token_logps_and_hits(hidden_BxLxD, head_VxD, targets_BxL, **kwargs)
    else:
        logp_BxL = token_logps(hidden_BxLxD, head_VxD, targets_BxL, **kwargs)
    return jnp.where(segment_ids_BxL > 0, logp_BxL, 0.0), hits_BxL


def length_bucket(n: int, cap: int) -> int:
    """The row length for an n-token sequence: the next power of two >= MIN_BUCKET, at most
    cap (but never below n)."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max(cap, n))


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """`rows` rows of `row_len` positions; `placed[r]` lists (sequence, first position) of
    the sequences packed into row r, in order."""

    row_len: int
    rows: int
    placed: list[list[tuple[int, int]]]

    def arrays(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
               ) -> dict[str, np.ndarray]:
        """inputs, targets, positions and segment_ids [rows, row_len] of (inputs, targets)
        pairs of equal length; empty rows and the tail of a row are padding (segment 0)."""
        shape = (self.rows, self.row_len)
        out = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.zeros(shape, np.int32),
               "positions": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32)}
        for r, row in enumerate(self.placed):
            for segment, (i, start) in enumerate(row, start=1):
                inputs, targets = sequences[i]
                end = start + len(inputs)
                out["inputs"][r, start:end] = inputs
                out["targets"][r, start:end] = targets
                out["positions"][r, start:end] = np.arange(len(inputs))
                out["segment_ids"][r, start:end] = segment
        return out


def pack(lengths: Sequence[int], *, num_rows: int, max_len: int) -> list[PackedBatch]:
    """Batches of `num_rows` rows that hold every sequence (by its length) once.

    Longest first: a batch's row length is `length_bucket` of the longest sequence not yet
    placed; its rows take, in decreasing length, every remaining sequence that fits the first
    row with room (first-fit decreasing), opening rows up to num_rows. Deterministic.
    """
    if any(n < 1 for n in lengths):
        raise ValueError("every packed sequence needs at least one token")
    remaining = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = []
    while remaining:
        row_len = length_bucket(lengths[remaining[0]], max_len)
        placed: list[list[tuple[int, int]]] = []
        free: list[int] = []
        left: list[int] = []
        shortest = lengths[remaining[-1]]
        for k, i in enumerate(remaining):
            n = lengths[i]
            row = next((r for r, room in enumerate(free) if room >= n), None)
            if row is None and len(placed) < num_rows:
                placed.append([])
                free.append(row_len)
                row = len(placed) - 1
            if row is None:
                left.append(i)
            else:
                placed[row].append((i, row_len - free[row]))
                free[row] -= n
            if len(placed) == num_rows and max(free) < shortest:
                left.extend(remaining[k + 1:])
                break
        batches.append(PackedBatch(row_len, num_rows, placed))
        remaining = left
    return batches
