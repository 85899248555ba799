"""The training state every stage carries, and how it takes an optimizer step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm.parallel import sharding


@flax.struct.dataclass
class TrainState:
    """step: optimizer steps taken (skipped ones included); params: the model pytree;
    opt_state: optax state; nonfinite: how many steps in a row had a NaN/Inf loss, gradient,
    update or new params (and were skipped)."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   nonfinite=jnp.zeros((), jnp.int32))

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation,
                        finite: jax.Array | bool = True,
                        update: jax.Array | bool = True) -> TrainState:
        """One optimizer update; when `finite` is False, or the update or the new params are
        not finite (a NaN learning rate, an overflow), the params and optimizer state are kept
        as they were (the step still counts, so the data and schedule move on). `update`
        False: no update was due (nothing to learn from); params, optimizer state (its count
        included) and the non-finite counter stay as they were, the step counts."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        # Integer leaves (QLoRA's quantized frozen base) are never updated.
        params = jax.tree.map(lambda p, u: optax.apply_updates(p, u)
                              if jnp.issubdtype(p.dtype, jnp.inexact) else p,
                              self.params, updates)
        finite = (finite & jnp.isfinite(optax.global_norm(updates))
                  & jnp.isfinite(float_norm(params)))
        take = finite & update
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(take, n, o), new, old)
        nonfinite = jnp.where(finite, 0, self.nonfinite + 1)
        return self.replace(step=self.step + 1, params=keep(params, self.params),
                            opt_state=keep(opt_state, self.opt_state),
                            nonfinite=jnp.where(update, nonfinite, self.nonfinite))


def float_norm(tree: Any) -> jax.Array:
    """Global L2 norm of the floating-point leaves (a quantized base's integers are codes,
    not values)."""
    return optax.global_norm([x for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)])


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
Freeze = Callable[[Any], Any]


def microbatched_grads(loss_fn: LossFn, params: Any, batch: dict[str, jax.Array],
                       grad_accum_steps: int, *, freeze: Freeze | None = None,
                       rng: jax.Array | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of a token-weighted loss summed over sequential microbatches.

    `loss_fn(params, batch) -> (loss_sum, aux)` returns a SUM over target tokens and aux must hold
    `num_tokens`; the result is the gradient of the mean over all tokens of the whole batch, the
    same number whether the batch is split or not. Aux values are summed over microbatches, and
    aux["objective_sum"] is the summed loss itself.

    freeze: params -> params with gradients stopped at the frozen leaves (LoRA's base weights,
    `jaxlm.models.lora.freeze`): their gradients are zero and never computed. rng: a key for the
    model's dropout; loss_fn is then called as loss_fn(params, batch, rng) with a different key
    per microbatch.
    """
    def objective(p: Any, micro: dict[str, jax.Array], index: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        p = p if freeze is None else freeze(p)
        if rng is None:
            loss_sum, aux = loss_fn(p, micro)
        else:
            loss_sum, aux = loss_fn(p, micro, jax.random.fold_in(rng, index))
        return loss_sum, {**aux, "objective_sum": loss_sum}

    grad_fn = float_leaf_grad(objective)
    if grad_accum_steps == 1:
        grads, aux = grad_fn(params, batch, jnp.zeros((), jnp.int32))
    else:
        split = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
            batch)

        def body(carry: tuple[Any, Any], micro_and_index: tuple[dict[str, jax.Array], jax.Array]
                 ) -> tuple[Any, None]:
            grads_acc, aux_acc = carry
            grads, aux = grad_fn(params, *micro_and_index)
            return (jax.tree.map(jnp.add, grads_acc, grads),
                    jax.tree.map(jnp.add, aux_acc, aux)), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], split)
        zero_aux = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: grad_fn(params, first, jnp.zeros((), jnp.int32))[1]))
        (grads, aux), _ = jax.lax.scan(body, (zero_grads, zero_aux),
                                       (split, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(aux["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return grads, aux


def float_leaf_grad(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """jax.grad(fn, has_aux=True) with respect to the floating-point leaves of fn's first
    argument. Integer leaves (QLoRA's quantized frozen base) are passed in undifferentiated
    and get zero gradients of their own dtype; an all-float tree is plain jax.grad."""
    plain = jax.grad(fn, has_aux=True)

    def grad_fn(params: Any, *args: Any) -> tuple[Any, Any]:
        leaves, treedef = jax.tree.flatten(params)
        floats = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
        if all(floats):
            return plain(params, *args)

        def merged(values: list[jax.Array]) -> Any:
            it = iter(values)
            return treedef.unflatten([next(it) if f else x for x, f in zip(leaves, floats)])

        grads, aux = jax.grad(lambda v, *a: fn(merged(v), *a), has_aux=True)(
            [x for x, f in zip(leaves, floats) if f], *args)
        it = iter(grads)
        return treedef.unflatten([next(it) if f else jnp.zeros_like(x)
                                  for x, f in zip(leaves, floats)]), aux

    return grad_fn


def update_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The optimizer's count of updates taken (what its learning-rate schedule reads), or
    `default` when its state holds no count."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else default


def gradient_step(state: TrainState, batch: dict[str, jax.Array], loss_fn: LossFn, *,
                  tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  grad_accum_steps: int = 1, freeze: Freeze | None = None,
                  dropout_seed: int | None = None, update: jax.Array | bool = True
                  ) -> tuple[TrainState, dict[str, jax.Array], dict[str, jax.Array]]:
    """What every stage's train step does around its loss: microbatched gradients, the update
    (skipped when the loss or gradient is not finite) and the common metrics.

    loss_fn(params, batch, rng) -> (loss_sum, aux) as in `microbatched_grads`; rng is None
    unless `dropout_seed` is set, then a key derived from it and the step (so a resumed run
    draws the same masks). Returns (new state, summed aux, {grad_norm, param_norm, lr,
    nonfinite}). `update` False: no optimizer update is due (`TrainState.apply_gradients`).
    """
    rng = None
    if dropout_seed is not None:
        rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    grads, aux = microbatched_grads(
        loss_fn if rng is not None else (lambda p, b: loss_fn(p, b, None)), state.params, batch,
        grad_accum_steps, freeze=freeze, rng=rng)
    grad_norm = optax.global_norm(grads)
    objective = aux.pop("objective_sum") / jnp.maximum(aux["num_tokens"], 1.0)
    finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads, tx, finite=finite, update=update)
    common = {"grad_norm": grad_norm, "param_norm": float_norm(state.params),
              "lr": lr_schedule(state.step), "nonfinite": new_state.nonfinite}
    return new_state, aux, common


def lora_step_options(config: Any) -> dict[str, Any]:
    """gradient_step's `freeze` and `dropout_seed` for a run config: with LoRA adapters the base
    is frozen, and their dropout draws from config.seed."""
    from jaxlm.models import lora

    rank, dropout = config.model.lora.rank, config.model.lora.dropout
    return {"freeze": lora.freeze if rank else None,
            "dropout_seed": config.seed if rank and dropout else None}


def abstract_boxed_params(model: nn.Module, seq_len: int) -> Any:
    """Shapes/dtypes of the params, still boxed with their logical axis names (no FLOPs).

    Tracing a model's init takes a good fraction of a second and a run asks for the same
    shapes several times (its state, its shardings, a restore, the sampler): the answer is
    kept per (model, seq_len, abstract mesh); each call gets its own containers."""
    cached = _abstract_boxed_params(model, seq_len, jax.sharding.get_abstract_mesh())
    return jax.tree.map(lambda x: x, cached)


@functools.lru_cache(maxsize=32)
def _abstract_boxed_params(model: nn.Module, seq_len: int, abstract_mesh: Any) -> Any:
    del abstract_mesh  # part of the key only: eval_shape's results may depend on it
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
                       rng: jax.Array, seq_len: int, shardings: TrainState | None = None
                       ) -> tuple[TrainState, TrainState]:
    """Abstract-first init: shapes -> shardings -> a jitted init that writes each shard in place,
    so the full state never sits on one device. Returns (state, its shardings); `shardings`:
    the state's, when the caller already has them."""
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)

    def init(rng_: jax.Array) -> TrainState:
        params = nn.meta.unbox(model.init(rng_, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return TrainState.create(params, tx)

    with sharding.activate(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
