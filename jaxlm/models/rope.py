"""Rotary position embeddings, half-split convention (the layout of Llama checkpoints on HF).

Context-extension variants change only the rotary frequencies (and, for YaRN, scale cos/sin):

* "linear": positions divided by `factor` (frequencies / factor).
* "dynamic" (NTK-aware): the base grows with the longest position of the call once it passes
  `original_max_len`: base * (factor * len / original - (factor - 1)) ** (K / (K - 2)).
* "llama3": long wavelengths divided by `factor`, short ones kept, a smooth ramp between
  (Llama 3.1 / 3.2).
* "yarn": a ramp over the frequency index between interpolation and extrapolation, and cos/sin
  scaled by `attention_factor` (0 = 0.1 ln(factor) + 1).

The formulas are those of Hugging Face transformers' `rope_type`s of the same names, so imported
checkpoints compute the same angles.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Context-extension settings of RoPE (`model.rope_scaling.*`).

    Attributes:
      kind: one of ROPE_SCALINGS.
      factor: context extension factor (linear, dynamic, llama3, yarn).
      original_max_len: the pretraining context (llama3, yarn; dynamic: the length beyond
        which the base grows).
      low_freq_factor, high_freq_factor: llama3 wavelength thresholds (original_max_len / x).
      beta_fast, beta_slow: yarn ramp bounds, in rotations over original_max_len.
      attention_factor: yarn cos/sin scale; 0 = 0.1 ln(factor) + 1.
      truncate: yarn rounds the ramp bounds to integers (transformers' default).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True

    def check(self, fail) -> None:
        """Calls fail(key, msg) with the `rope_scaling.*` key that is inconsistent."""
        if self.kind not in ROPE_SCALINGS:
            fail("rope_scaling.kind", f"{self.kind!r} not in {ROPE_SCALINGS}")
        if self.kind == "none":
            return
        if self.factor <= 0:
            fail("rope_scaling.factor", f"must be positive, got {self.factor}")
        if self.kind in ("dynamic", "llama3", "yarn") and self.original_max_len <= 0:
            fail("rope_scaling.original_max_len", f"{self.kind} scaling needs the pretraining "
                 "context length (> 0)")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            fail("rope_scaling.high_freq_factor", "must exceed rope_scaling.low_freq_factor")


NO_SCALING = RopeScaling()


def _pos_freqs(k: int, theta) -> jax.Array:
    """theta^(2i/K), i < K/2, in float32 (jnp's pow rounds like torch's on CPU)."""
    return jnp.asarray(theta, jnp.float32) ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)


def _llama3(inv_freq_F: jax.Array, s: RopeScaling) -> jax.Array:
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    scaled_F = jnp.where(wavelen_F > low_wavelen, inv_freq_F / s.factor, inv_freq_F)
    smooth_F = ((s.original_max_len / wavelen_F - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor))
    smoothed_F = (1 - smooth_F) * scaled_F / s.factor + smooth_F * scaled_F
    medium_F = (wavelen_F >= high_wavelen) & (wavelen_F <= low_wavelen)
    return jnp.where(medium_F, smoothed_F, scaled_F)


def yarn_attention_factor(s: RopeScaling) -> float:
    if s.attention_factor:
        return s.attention_factor
    return 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0


def _yarn(k: int, theta: float, s: RopeScaling) -> jax.Array:
    def correction_dim(rotations: float) -> float:
        return (k * math.log(s.original_max_len / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, k - 1)
    if low == high:
        high += 0.001
    ramp_F = jnp.clip((jnp.arange(k // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_F = 1 - ramp_F
    pos_freqs_F = _pos_freqs(k, theta)
    extra_F, inter_F = 1.0 / pos_freqs_F, 1.0 / (s.factor * pos_freqs_F)
    return inter_F * (1 - extrapolation_F) + extra_F * extrapolation_F


def inv_frequencies(k: int, theta: float, scaling: RopeScaling = NO_SCALING,
                    seq_len: jax.Array | None = None) -> jax.Array:
    """The K/2 rotary frequencies [F] (float32); `seq_len` (the longest position + 1 of the
    call) is read by "dynamic" scaling only."""
    kind = scaling.kind
    if kind == "dynamic":
        orig = scaling.original_max_len
        length = jnp.maximum(jnp.asarray(orig, jnp.float32),
                             jnp.asarray(orig if seq_len is None else seq_len, jnp.float32))
        base = theta * ((scaling.factor * length / orig) - (scaling.factor - 1)) ** (k / (k - 2))
        return 1.0 / _pos_freqs(k, base)
    if kind == "yarn":
        return _yarn(k, theta, scaling)
    inv_freq_F = 1.0 / _pos_freqs(k, theta)
    if kind == "linear":
        inv_freq_F = inv_freq_F / scaling.factor
    elif kind == "llama3":
        inv_freq_F = _llama3(inv_freq_F, scaling)
    return inv_freq_F


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float,
               scaling: RopeScaling = NO_SCALING) -> jax.Array:
    """Rotates pairs (i, i + K/2) of each head by angle position * inv_freq[i]."""
    k = x_BxLxHxK.shape[-1]
    seq_len = jnp.max(positions_BxL) + 1 if scaling.kind == "dynamic" else None
    inv_freq_F = inv_frequencies(k, theta, scaling, seq_len)
    angle_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F
    sin_BxLx1xF = jnp.sin(angle_BxLxF)[:, :, None, :]
    cos_BxLx1xF = jnp.cos(angle_BxLxF)[:, :, None, :]
    if scaling.kind == "yarn":
        scale = yarn_attention_factor(scaling)
        sin_BxLx1xF, cos_BxLx1xF = sin_BxLx1xF * scale, cos_BxLx1xF * scale
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF,
                           x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
    return out.astype(x_BxLxHxK.dtype)
