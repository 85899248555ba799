"""The training state every stage carries, and how it takes an optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm import sharding


@flax.struct.dataclass
class TrainState:
    """step: optimizer steps taken (skipped ones included); params: the model pytree;
    opt_state: optax state; nonfinite: how many steps in a row had a NaN/Inf loss or gradient."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   nonfinite=jnp.zeros((), jnp.int32))

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation,
                        finite: jax.Array | bool = True) -> TrainState:
        """One optimizer update; when `finite` is False the params and optimizer state are
        kept as they were (the step still counts, so the data and schedule move on)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        return self.replace(step=self.step + 1, params=keep(params, self.params),
                            opt_state=keep(opt_state, self.opt_state),
                            nonfinite=jnp.where(finite, 0, self.nonfinite + 1))


LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def microbatched_grads(loss_fn: LossFn, params: Any, batch: dict[str, jax.Array],
                       num_microbatches: int) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of a token-weighted loss summed over sequential microbatches.

    `loss_fn(params, batch) -> (loss_sum, aux)` returns a SUM over target tokens and aux must hold
    `num_tokens`; the result is the gradient of the mean over all tokens of the whole batch, the
    same number whether the batch is split or not. Aux values are summed over microbatches.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        grads, aux = grad_fn(params, batch)
    else:
        split = jax.tree.map(
            lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]),
            batch)

        def body(carry: tuple[Any, Any], micro: dict[str, jax.Array]) -> tuple[Any, None]:
            grads_acc, aux_acc = carry
            grads, aux = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grads_acc, grads),
                    jax.tree.map(jnp.add, aux_acc, aux)), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], split)
        zero_aux = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first)[1]))
        (grads, aux), _ = jax.lax.scan(body, (zero_grads, zero_aux), split)
    denom = jnp.maximum(aux["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return grads, aux


def abstract_boxed_params(model: nn.Module, seq_len: int) -> Any:
    """Shapes/dtypes of the params, still boxed with their logical axis names (no FLOPs)."""
    tokens_1xL = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda rng, t: model.init(rng, t)["params"], jax.random.key(0),
                          tokens_1xL)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    seq_len: int) -> TrainState:
    """NamedShardings of a TrainState: params by their logical names, optimizer moments like
    the params they belong to, scalars replicated."""
    boxed = abstract_boxed_params(model, seq_len)
    param_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # MaskedNode: a leaf without optimizer state (optax.masked / multi_transform, e.g. LoRA).
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shardings = optax.tree_map_params(
        tx, lambda v, s: v if masked(v) else s, abstract_opt, param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)
    return TrainState(step=sharding.replicated(mesh), params=param_shardings,
                      opt_state=opt_shardings, nonfinite=sharding.replicated(mesh))


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState,
                   seq_len: int) -> TrainState:
    """ShapeDtypeStructs of the TrainState carrying `shardings`: what a restore writes into."""
    params = nn.meta.unbox(abstract_boxed_params(model, seq_len))
    shapes = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shapes, shardings)


def create_from_params(params: Any, tx: optax.GradientTransformation,
                       shardings: TrainState) -> TrainState:
    """A fresh TrainState (step 0, new optimizer state) around existing params."""
    return jax.jit(lambda p: TrainState.create(p, tx), out_shardings=shardings)(params)


def init_sharded_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array, seq_len: int) -> tuple[TrainState, TrainState]:
    """Abstract-first init: shapes -> shardings -> a jitted init that writes each shard in place,
    so the full state never sits on one device. Returns (state, its shardings)."""
    shardings = state_shardings(model, tx, mesh, seq_len)

    def init(rng_: jax.Array) -> TrainState:
        params = nn.meta.unbox(model.init(rng_, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return TrainState.create(params, tx)

    with sharding.activate(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
