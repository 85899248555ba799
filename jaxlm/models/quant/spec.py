"""How a model's matmul weights are quantized: the `quant` config section as a value.

A `QuantSpec` is part of `ModelConfig` (hashable, so it can sit on a flax Module):
  mode "none": float weights;
  mode "ptq":  the matmul weights are held quantized (qwix QArrays) and the matmuls take them
               as they are (post-training quantization, and QLoRA's frozen base);
  mode "qat":  float weights, fake-quantized in the forward pass with the same quantizer
               (straight-through gradient), so the trained model converts to "ptq" exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxlm.run.errors import ConfigError

MODES = ("none", "ptq", "qat")
WEIGHT_TYPES = ("int8", "int4", "nf4")
ACTIVATION_TYPES = ("none", "int8")
# Bits per stored weight of each type (the size report counts these, not the container).
BITS = {"int8": 8, "int4": 4, "nf4": 4}
# --quantize names of the command-line tools: (weight type, activation type).
PRESETS = {"int8": ("int8", "none"), "int4": ("int4", "none"), "nf4": ("nf4", "none"),
           "int8_dynamic": ("int8", "int8")}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """mode: "none" | "ptq" | "qat"; weight: "int8" | "int4" | "nf4"; activation: "none" |
    "int8" (per-token dynamic range, int8 x int8 matmuls; ptq only); tile_size: 0 = one scale
    per output channel, T > 0 = one scale per T consecutive inputs of each output channel
    (sub-channel)."""

    mode: str = "none"
    weight: str = "int8"
    activation: str = "none"
    tile_size: int = 0

    @property
    def qtype(self) -> Any:
        """The qwix qtype of the weights: jnp.int8, jnp.int4 or "nf4"."""
        return {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[self.weight]

    @property
    def quantized(self) -> bool:
        """The weights are held as QArrays."""
        return self.mode == "ptq"

    def check(self, fail: Callable[[str, str], None]) -> None:
        """Calls fail(key, message) for the first `quant.*` key that is invalid."""
        if self.mode not in MODES:
            fail("mode", f"{self.mode!r} not in {MODES}")
        if self.weight not in WEIGHT_TYPES:
            fail("weight", f"{self.weight!r} not in {WEIGHT_TYPES}")
        if self.activation not in ACTIVATION_TYPES:
            fail("activation", f"{self.activation!r} not in {ACTIVATION_TYPES}")
        if self.tile_size < 0:
            fail("tile_size", f"must be >= 0 (0 = per channel; -1 in a run config = the "
                 f"weight type's default), got {self.tile_size}")
        if self.activation != "none" and self.mode != "ptq":
            fail("activation", "activations are quantized only with quant.mode='ptq' (dynamic "
                 "range at inference)")
        if self.activation == "int8" and self.weight != "int8":
            fail("activation", f"int8 activations need int8 weights (int8 x int8 matmuls), got "
                 f"quant.weight={self.weight!r}")


NO_QUANT = QuantSpec()


def from_preset(name: str, tile_size: int = 0) -> QuantSpec:
    """The ptq spec of a --quantize name (int8, int4, nf4, int8_dynamic)."""
    if name not in PRESETS:
        raise ConfigError(f"--quantize={name!r}: not one of {sorted(PRESETS)}")
    weight, activation = PRESETS[name]
    return QuantSpec("ptq", weight, activation, tile_size)
