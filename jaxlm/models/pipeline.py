"""GPipe-style pipeline schedule over the `pipeline` mesh axis.

The transformer's stacked block parameters [layers, ...] are sharded over `pipeline` on their
leading axis, so device row s of that axis holds layers [s*L/P, (s+1)*L/P): viewed as
[P, L/P, ...], stage s's parameters are the shard it already has. The batch is cut into M
microbatches and a [P, ...] buffer holds what each stage works on:

    t = 0 .. M+P-2:   every stage s runs its L/P layers on buffer[s]       (one vmap over stages)
                      buffer[P-1] is microbatch t-(P-1)'s output            (kept once t >= P-1)
                      buffer <- roll(buffer, 1); buffer[0] <- microbatch t+1

This is written with sharding annotations rather than `shard_map`: the stage axis of the buffer
and of the parameters is constrained to `pipeline`, the vmap over stages carries
`spmd_axis_name="pipeline"` (so the blocks' own activation constraints keep that axis), and XLA's
SPMD partitioner turns the vmapped stage into per-device work and the roll into a
collective-permute. Everything else (data/fsdp/tensor sharding inside a block, the custom-VJP
kernels, autodiff, remat) works unchanged, and the backward pass is the reverse schedule that
autodiff of the scan produces. See docs/pipeline.md.

Of the (M+P-1) * P stage-steps, P*(P-1) run on filler input (the fill and drain), so the idle
fraction is (P-1)/(M+P-1): `bubble_fraction`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import sharding


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe schedule: (P-1)/(M+P-1); 0 without pipelining."""
    return (stages - 1) / (microbatches + stages - 1)


def num_microbatches(batch: int, requested: int) -> int:
    """Microbatches a batch of `batch` rows is cut into: `requested` when it divides the batch
    (training batches are validated to), else their gcd (e.g. 1 for the sampler's batch of 1)."""
    return math.gcd(batch, requested)


def split_microbatches(x_Bx: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], microbatch i = rows i, i+M, i+2M, ...

    Strided rather than contiguous so that each microbatch keeps rows on every data-parallel
    device (the batch is sharded over data/fsdp in contiguous blocks of B/dp rows).
    """
    b = x_Bx.shape[0]
    return jnp.swapaxes(x_Bx.reshape(b // m, m, *x_Bx.shape[1:]), 0, 1)


def merge_microbatches(x_MxBx: jax.Array) -> jax.Array:
    """Inverse of `split_microbatches`."""
    m, mb = x_MxBx.shape[:2]
    return jnp.swapaxes(x_MxBx, 0, 1).reshape(m * mb, *x_MxBx.shape[2:])


def to_stages(params: Any, stages: int) -> Any:
    """Stacked block params [L, ...] -> [P, L/P, ...] with the stage axis on `pipeline`."""
    def one(p: jax.Array) -> jax.Array:
        p = p.reshape(stages, p.shape[0] // stages, *p.shape[1:])
        return sharding.constrain_leading(p, "stages")
    return jax.tree.map(one, params)


def gpipe(stage_fn: Callable[..., jax.Array], stage_params: Any, x_MxBx: jax.Array,
          side_inputs: Sequence[jax.Array], x_axes: Sequence[str | None],
          side_axes: Sequence[Sequence[str | None]]) -> jax.Array:
    """Runs `stage_fn` P times in sequence over M microbatches with a GPipe schedule.

    Args:
      stage_fn: `stage_fn(params_of_one_stage, x, *side) -> x'` for one microbatch.
      stage_params: pytree with a leading stage axis [P, ...] (see `to_stages`).
      x_MxBx: the microbatched activations [M, ...].
      side_inputs: per-microbatch inputs [M, ...] that travel with x unchanged (positions,
        segment ids).
      x_axes, side_axes: logical names of one microbatch of x and of each side input, used
        to constrain the [P, ...] buffers (stage axis on `pipeline`).

    Returns:
      [M, ...]: stage P-1's output for every microbatch, equal to applying the stages in
      sequence to each microbatch.
    """
    stages = jax.tree.leaves(stage_params)[0].shape[0]
    m = x_MxBx.shape[0]
    carry_axes = (tuple(x_axes), *map(tuple, side_axes))

    def constrain(buf: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(sharding.constrain(b, ("stages", *axes)) for b, axes in zip(buf, carry_axes))

    inputs = (x_MxBx, *side_inputs)
    # Every slot starts on microbatch 0 (not zeros), so the filler work of the fill phase runs
    # on real data and cannot produce NaN/Inf that would leak into gradients as 0 * NaN.
    buf = constrain(tuple(jnp.broadcast_to(a[0], (stages, *a.shape[1:])) for a in inputs))
    run_stages = jax.vmap(stage_fn, spmd_axis_name="pipeline")

    def tick(carry: tuple[Any, jax.Array], t: jax.Array) -> tuple[Any, None]:
        buf, out_MxBx = carry
        y_PxBx = run_stages(stage_params, *buf)
        # The last stage's result is microbatch t-(P-1); earlier ticks write filler into slot 0,
        # which tick P-1 overwrites.
        done = jnp.maximum(t - (stages - 1), 0)
        out_MxBx = jax.lax.dynamic_update_index_in_dim(out_MxBx, y_PxBx[stages - 1], done, 0)
        nxt = jnp.minimum(t + 1, m - 1)
        shifted = (jnp.roll(y_PxBx, 1, axis=0), *(jnp.roll(s, 1, axis=0) for s in buf[1:]))
        buf = tuple(s.at[0].set(jax.lax.dynamic_index_in_dim(a, nxt, 0, keepdims=False))
                    for s, a in zip(shifted, inputs))
        return (constrain(buf), out_MxBx), None

    out_MxBx = jnp.zeros_like(x_MxBx)
    (_, out_MxBx), _ = jax.lax.scan(tick, (buf, out_MxBx), jnp.arange(m + stages - 1))
    return out_MxBx
