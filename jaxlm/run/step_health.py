"""Per-step checks of a training run: skipped non-finite steps, and a gradient stuck at zero.

The train step skips an update whose loss, gradient, update or new params are NaN/Inf
(`TrainState.apply_gradients`) and counts such steps in a row; `StepHealth.check` warns about
each and stops the run after train.max_nonfinite. A gradient norm of exactly 0 for
ZERO_GRAD_STEPS steps in a row (a model that no longer learns, e.g. saturated by a huge
learning rate) is reported once.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging

from jaxlm.run.errors import NonFiniteError

ZERO_GRAD_STEPS = 3


class StepHealth:
    """Reads each step's `nonfinite` and `grad_norm` (one small transfer) and reacts."""

    def __init__(self, max_nonfinite: int):
        self.max_nonfinite = max_nonfinite
        self.zero_grad_in_a_row = 0
        self.zero_grad_reported = False
        self.last_step = -1

    def check(self, metrics: dict[str, Any], step: int) -> None:
        """Checks `step`'s metrics once (a step checked before, e.g. at a save, is skipped)."""
        if step <= self.last_step:
            return
        self.last_step = step
        values = jax.device_get({k: metrics[k] for k in ("nonfinite", "grad_norm")
                                 if k in metrics})
        self._check_finite(int(values["nonfinite"]), step)
        if "grad_norm" in values:
            self._check_zero_grad(float(values["grad_norm"]), step)

    def _check_finite(self, in_a_row: int, step: int) -> None:
        if not in_a_row:
            return
        logging.warning("step %d: loss, gradient, update or parameter norm is NaN/Inf; update "
                        "skipped (%d in a row)", step, in_a_row)
        if in_a_row >= self.max_nonfinite:
            raise NonFiniteError(
                f"{in_a_row} steps in a row (up to step {step}) had a NaN/Inf loss, gradient, "
                f"update or parameter norm (train.max_nonfinite={self.max_nonfinite}); stopping. "
                "The parameters are those of the last finite step. Lower optim.learning_rate, "
                "check the data, or raise train.max_nonfinite.")

    def _check_zero_grad(self, grad_norm: float, step: int) -> None:
        self.zero_grad_in_a_row = self.zero_grad_in_a_row + 1 if grad_norm == 0.0 else 0
        if self.zero_grad_in_a_row >= ZERO_GRAD_STEPS and not self.zero_grad_reported:
            self.zero_grad_reported = True
            logging.warning("step %d: the gradient norm has been exactly 0 for %d steps in a "
                            "row; the model no longer learns (a learning rate too high for the "
                            "model saturates it: lower optim.learning_rate)", step,
                            self.zero_grad_in_a_row)
