"""The optimizer: global-norm clipping, AdamW with masked weight decay, warmup-cosine schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from jaxlm.run import errors
from jaxlm.run.section import Section

# Leaf names of parameters that are embedding tables (decayed only if optim.decay_embeddings).
EMBEDDING_NAMES = ("embed", "pos_embed")
# Leaf names that are never decayed: norm scales/biases and dense biases.
NO_DECAY_NAMES = ("scale", "bias", "bq", "bk", "bv", "bo", "b_in", "b_out")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine to peak * min_lr_ratio at the end."""
    peak = optim.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=peak * optim.min_lr_ratio)


def weight_decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True for the leaves that weight decay applies to (matrices; embeddings if asked)."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = keys[-1] if keys else ""
        if name in EMBEDDING_NAMES:
            return decay_embeddings
        return name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """Clipping + AdamW on `schedule` (default: `learning_rate_schedule(optim, total_steps)`)."""
    schedule = schedule or learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda p: weight_decay_mask(p, optim.decay_embeddings)))
    return optax.chain(*parts)


def train_only(tx: optax.GradientTransformation,
               trainable: Callable[[Any], Any]) -> optax.GradientTransformation:
    """`tx` on the leaves `trainable(params)` marks True; the others get zero updates and no
    optimizer state at all (optax.set_to_zero), e.g. everything but LoRA adapters."""
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of tx's optimizer state for `params` (shapes only; nothing is allocated)."""
    shapes = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)
               if hasattr(x, "dtype"))


def default_optim_config() -> ml_collections.ConfigDict:
    """The `optim` section with its defaults."""
    o = ml_collections.ConfigDict()
    # Peak learning rate, reached at the end of warmup.
    o.learning_rate = 3e-4
    # Linear warmup from 0 to learning_rate over this many steps.
    o.warmup_steps = 100
    # Cosine decay ends at learning_rate * min_lr_ratio on the last step.
    o.min_lr_ratio = 0.1
    # AdamW moments and epsilon.
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    # Decoupled weight decay; never applied to norms and biases.
    o.weight_decay = 0.1
    # Whether weight decay applies to the embedding table (and position table).
    o.decay_embeddings = False
    # Global-norm gradient clipping; 0 disables.
    o.clip_norm = 1.0
    # Coefficient of the z-loss (log Z)^2 that keeps the softmax normaliser near 1; 0 disables.
    o.z_loss = 0.0
    # Gradient accumulation: each step's batch is split into this many sequential microbatches.
    o.grad_accum_steps = 1
    return o


def check_optim(config: ml_collections.ConfigDict) -> None:
    """Raises naming the `optim.*` key whose value AdamW or the schedule cannot use."""
    o = config.optim
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be positive, got {o.learning_rate}")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"must lie in [0, 1], got {o.min_lr_ratio}")
    # AdamW: a moment decay of 1 never forgets (b2 = 1 divides by a zero bias correction), eps
    # <= 0 can divide by zero, and a negative decay pushes weights away from 0.
    errors.check_interval("optim.b1", o.b1, 0, 1, "[)")
    errors.check_interval("optim.b2", o.b2, 0, 1, "[)")
    if o.eps <= 0:
        _fail("optim.eps", f"must be positive, got {o.eps}")
    errors.check_at_least("optim.weight_decay", o.weight_decay, 0)
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.grad_accum_steps < 1:
        _fail("optim.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}")
    if o.clip_norm < 0:
        _fail("optim.clip_norm", f"must be >= 0 (0 disables clipping), got {o.clip_norm}")


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(key, msg)


OPTIM = Section("optim", default_optim_config, check_optim)
