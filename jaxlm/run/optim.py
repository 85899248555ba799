"""The optimizer: global-norm clipping, AdamW with masked weight decay, warmup-cosine schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

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
