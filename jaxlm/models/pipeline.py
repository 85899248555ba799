"""Pipeline schedules over the `pipeline` mesh axis: GPipe and its circular (looped) form.

The transformer's stacked block parameters [L, ...] are cut into P*V chunks of K = L/(P*V)
consecutive layers; chunk c lives on stage c mod P as that stage's repeat c // P. With V = 1
(GPipe) stage s holds layers [s*L/P, (s+1)*L/P), exactly the shard the `layers`-on-`pipeline`
sharding gives it. With V > 1 (circular) stage s holds the non-contiguous chunks s, s+P, ...,
s+(V-1)P and every microbatch goes round the ring of stages V times. The batch is cut into M
microbatches; with Q = max(M, P) slots per lap (Q = M for GPipe), stage s at tick t works on

    k = t - s,   microbatch k mod Q,   repeat k // Q,     real work iff k mod Q < M, 0 <= k < V*Q

A [P, ...] buffer holds each stage's current input: every tick all stages run their chunk at
once (one vmap over stages), the buffer rolls by one stage, and slot 0 is refilled from a
[Q, ...] store that starts as the microbatches and receives the last stage's output of each lap
(`microbatch_store`). A microbatch leaves stage P-1 at tick k + P - 1 and needs stage 0 again at
tick k + Q, which is why a lap has at least P slots (Q >= P): for M < P the store has filler
slots. After the last lap the store holds the outputs.

This is written with sharding annotations rather than `shard_map`: the stage axis of the buffer
and of the parameters is constrained to `pipeline`, the vmap over stages carries
`spmd_axis_name="pipeline"` (so the blocks' own activation constraints keep that axis), and XLA's
SPMD partitioner turns the vmapped stage into per-device work and the roll into a
collective-permute. Everything else (data/fsdp/tensor sharding inside a block, the custom-VJP
kernels, autodiff, remat) works unchanged, and the backward pass is the reverse schedule that
autodiff of the scan produces. See docs/pipeline.md.

The scan has T = (V-1)*Q + M + P - 1 ticks (`num_ticks`); of its P*T stage-steps P*V*M do real
work, so the idle fraction is 1 - V*M/T: (P-1)/(V*M+P-1) when M >= P (`bubble_fraction`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.parallel import sharding


def lap_slots(stages: int, microbatches: int, repeats: int) -> int:
    """Q: ticks between a microbatch's visits to stage 0; M, or max(M, P) with repeats."""
    return microbatches if repeats == 1 else max(microbatches, stages)


def num_ticks(stages: int, microbatches: int, repeats: int = 1) -> int:
    """T = (V-1)*Q + M + P - 1: the ticks of the schedule (M + P - 1 for GPipe)."""
    q = lap_slots(stages, microbatches, repeats)
    return (repeats - 1) * q + microbatches + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle fraction of the schedule, 1 - V*M/T: (P-1)/(M+P-1) for GPipe (V=1),
    (P-1)/(V*M+P-1) for the circular schedule when M >= P; 0 without pipelining."""
    return 1.0 - repeats * microbatches / num_ticks(stages, microbatches, repeats)


def schedule_table(stages: int, microbatches: int, repeats: int = 1
                   ) -> list[list[tuple[int, int] | None]]:
    """table[t][s] = (microbatch, repeat) that stage s works on at tick t, or None when idle.
    The same index arithmetic as `circular`, in Python, for docs and tests."""
    q = lap_slots(stages, microbatches, repeats)
    table = []
    for t in range(num_ticks(stages, microbatches, repeats)):
        row = []
        for s in range(stages):
            k = t - s
            real = 0 <= k < repeats * q and k % q < microbatches
            row.append((k % q, k // q) if real else None)
        table.append(row)
    return table


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


def to_stages(params: Any, stages: int, repeats: int = 1) -> Any:
    """Stacked block params [L, ...] -> [P, V, L/(P*V), ...] with the stage axis on `pipeline`:
    [s, r] is chunk r*P + s, layers [(r*P+s)*K, (r*P+s+1)*K).

    For V = 1 this is a reshape of the shard each device already holds. For V > 1 it is a
    transpose across the `pipeline` axis (stage s needs chunks s, s+P, ..., but holds the
    contiguous layers [s*L/P, (s+1)*L/P)): XLA moves (1 - 1/P) of the block parameters between
    pipeline devices every step (and the gradients back); see docs/pipeline.md.
    """
    def one(p: jax.Array) -> jax.Array:
        k = p.shape[0] // (stages * repeats)
        p = jnp.swapaxes(p.reshape(repeats, stages, k, *p.shape[1:]), 0, 1)
        return sharding.constrain_leading(p, "stages")
    return jax.tree.map(one, params)


def circular(stage_fn: Callable[..., jax.Array], stage_params: Any, x_MxBx: jax.Array,
             side_inputs: Sequence[jax.Array], x_axes: Sequence[str | None],
             side_axes: Sequence[Sequence[str | None]]) -> jax.Array:
    """Runs the P*V chunks of `stage_params` in order over M microbatches, circular schedule.

    Args:
      stage_fn: `stage_fn(params_of_one_chunk, x, *side) -> x'` for one microbatch.
      stage_params: pytree with leading [P, V, ...] axes (see `to_stages`): [s, r] is chunk
        r*P + s. V = 1 is the GPipe schedule.
      x_MxBx: the microbatched activations [M, ...].
      side_inputs: per-microbatch inputs [M, ...] that travel with x unchanged (positions,
        segment ids).
      x_axes, side_axes: logical names of one microbatch of x and of each side input, used
        to constrain the [P, ...] buffers (stage axis on `pipeline`).

    Returns:
      [M, ...]: every microbatch after chunks 0, 1, ..., P*V-1 in sequence.
    """
    stages, repeats = jax.tree.leaves(stage_params)[0].shape[:2]
    m = x_MxBx.shape[0]
    q = lap_slots(stages, m, repeats)
    carry_axes = (tuple(x_axes), *map(tuple, side_axes))

    def constrain(buf: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(sharding.constrain(b, ("stages", *axes)) for b, axes in zip(buf, carry_axes))

    # Filler slots (fill, drain, and the Q - M spare slots of a lap when M < P) hold copies of
    # microbatch 0 rather than zeros, so filler work sees real data and cannot produce NaN/Inf
    # that would leak into gradients as 0 * NaN.
    def pad(a: jax.Array) -> jax.Array:
        return jnp.concatenate([a, jnp.broadcast_to(a[:1], (q - m, *a.shape[1:]))])

    x_QxBx, *side_Qx = (pad(a) for a in (x_MxBx, *side_inputs))
    buf = constrain(tuple(jnp.broadcast_to(a[0], (stages, *a.shape[1:]))
                          for a in (x_QxBx, *side_Qx)))

    def run_chunk(params_Vx: Any, repeat: jax.Array, *xs: jax.Array) -> jax.Array:
        if repeats == 1:
            return stage_fn(jax.tree.map(lambda p: p[0], params_Vx), *xs)
        chunk = jax.tree.map(
            lambda p: jax.lax.dynamic_index_in_dim(p, repeat, 0, keepdims=False), params_Vx)
        return stage_fn(chunk, *xs)

    run_stages = jax.vmap(run_chunk, spmd_axis_name="pipeline")
    stage_ids = jnp.arange(stages)

    def tick(carry: tuple[Any, jax.Array], t: jax.Array) -> tuple[Any, None]:
        buf, store_QxBx = carry
        repeat_P = jnp.clip((t - stage_ids) // q, 0, repeats - 1)
        y_PxBx = run_stages(stage_params, repeat_P, *buf)
        # The last stage finished lap (t-(P-1)) // Q of slot (t-(P-1)) mod Q; before tick P-1
        # it has only filler, which must not overwrite a slot stage 0 has still to read.
        done = t - (stages - 1)
        slot = jnp.maximum(done, 0) % q
        old = jax.lax.dynamic_index_in_dim(store_QxBx, slot, 0, keepdims=False)
        new = jnp.where(done >= 0, y_PxBx[stages - 1], old)
        store_QxBx = jax.lax.dynamic_update_index_in_dim(store_QxBx, new, slot, 0)
        # Stage 0's next input: slot (t+1) mod Q of the store, fresh or back from a lap.
        nxt = (t + 1) % q
        shifted = (jnp.roll(y_PxBx, 1, axis=0), *(jnp.roll(s, 1, axis=0) for s in buf[1:]))
        sources = (store_QxBx, *side_Qx)
        buf = tuple(s.at[0].set(jax.lax.dynamic_index_in_dim(a, nxt, 0, keepdims=False))
                    for s, a in zip(shifted, sources))
        return (constrain(buf), store_QxBx), None

    ticks = jnp.arange(num_ticks(stages, m, repeats))
    (_, store_QxBx), _ = jax.lax.scan(tick, (buf, x_QxBx), ticks)
    return store_QxBx[:m]


def gpipe(stage_fn: Callable[..., jax.Array], stage_params: Any, x_MxBx: jax.Array,
          side_inputs: Sequence[jax.Array], x_axes: Sequence[str | None],
          side_axes: Sequence[Sequence[str | None]]) -> jax.Array:
    """`circular` with one repeat: `stage_params` has a leading stage axis [P, ...] only."""
    params_Px1 = jax.tree.map(lambda p: p[:, None], stage_params)
    return circular(stage_fn, params_Px1, x_MxBx, side_inputs, x_axes, side_axes)
