"""Several optimizer updates on one rollout batch: the epoch loop of GRPO and PPO."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.run.train_state import LossFn, TrainState, gradient_step


def epoch_updates(state: TrainState, flat: dict[str, jax.Array], micro: LossFn, *,
                  num_epochs: int, tx: optax.GradientTransformation,
                  lr_schedule: optax.Schedule, grad_accum_steps: int = 1, freeze: Any = None,
                  dropout_seed: int | None = None
                  ) -> tuple[TrainState, dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
    """`num_epochs` gradient steps of `micro` on the same rows.

    Returns (new state, the first epoch's summed aux: the loss before any update,
    "clipped_sum" added over every epoch, the last update's common metrics). `micro`'s aux
    must hold "clipped_sum", the count of tokens whose ratio was clipped.
    """
    first, clipped = None, 0.0
    for _ in range(num_epochs):
        state, sums, common = gradient_step(
            state, flat, micro, tx=tx, lr_schedule=lr_schedule,
            grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed)
        first = sums if first is None else first
        clipped = clipped + sums["clipped_sum"]
    return state, first, clipped, common
