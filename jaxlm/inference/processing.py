"""Turning next-token logits into a token: repetition penalty, temperature, top-k, top-p, min-p.

The settings are a pytree of scalars (`SamplingParams`), traced rather than static, so one
compiled decode loop serves every combination. Filters replace the logits they drop with -inf;
they apply in the order penalty -> temperature -> top-k -> top-p -> min-p (as in Hugging Face
`generate`). Temperature 0 means greedy: the argmax of the penalised logits.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplingParams:
    """temperature: 0 = greedy; top_k: keep the k most likely tokens (0 = off); top_p: keep the
    smallest set of most likely tokens whose probability reaches p (1 = off); min_p: keep tokens
    with probability >= min_p * the top token's (0 = off); repetition_penalty: divide positive /
    multiply negative logits of tokens already in the prompt or output by this (1 = off)."""

    temperature: float | jax.Array = 0.0
    top_k: int | jax.Array = 0
    top_p: float | jax.Array = 1.0
    min_p: float | jax.Array = 0.0
    repetition_penalty: float | jax.Array = 1.0

    def check(self) -> None:
        """Raises ValueError naming the setting that is out of range (host-side values only)."""
        checks = [("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"sampling setting {name}={getattr(self, name)} must be {rule}")


def as_arrays(params: SamplingParams) -> SamplingParams:
    return SamplingParams(*(jnp.asarray(v, jnp.int32 if name == "top_k" else jnp.float32)
                            for name, v in vars(params).items()))


def repetition_penalty(logits_BxV: jax.Array, seen_BxV: jax.Array,
                       penalty: jax.Array) -> jax.Array:
    """Seen tokens: logit / penalty if positive, logit * penalty otherwise (CTRL, Keskar 2019)."""
    penalised = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
    return jnp.where(seen_BxV, penalised, logits_BxV)


def top_k(logits_BxV: jax.Array, k: jax.Array) -> jax.Array:
    """Keeps logits >= the k-th largest (ties with it kept); k <= 0 keeps all."""
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_Bx1 = jnp.take(sorted_BxV, jnp.clip(k - 1, 0, logits_BxV.shape[-1] - 1), axis=-1)[:, None]
    keep = (logits_BxV >= kth_Bx1) | (k <= 0)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def top_p(logits_BxV: jax.Array, p: jax.Array) -> jax.Array:
    """Keeps the most likely tokens while the probability mass before each is < p."""
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = (mass_before_BxV < p) | (jnp.arange(logits_BxV.shape[-1]) == 0)
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    keep = (logits_BxV >= threshold_Bx1) | (p >= 1)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def min_p(logits_BxV: jax.Array, ratio: jax.Array) -> jax.Array:
    """Keeps tokens whose probability is >= ratio * the largest probability."""
    log_probs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    floor_Bx1 = jnp.max(log_probs_BxV, axis=-1, keepdims=True) + jnp.log(ratio)
    return jnp.where((log_probs_BxV >= floor_Bx1) | (ratio <= 0), logits_BxV, -jnp.inf)


def process(logits_BxV: jax.Array, seen_BxV: jax.Array, params: SamplingParams) -> jax.Array:
    """The filtered, temperature-scaled logits that sampling draws from."""
    logits_BxV = repetition_penalty(logits_BxV, seen_BxV, params.repetition_penalty)
    logits_BxV = logits_BxV / jnp.maximum(params.temperature, 1e-6)
    logits_BxV = top_k(logits_BxV, params.top_k)
    logits_BxV = top_p(logits_BxV, params.top_p)
    return min_p(logits_BxV, params.min_p)


def choose(rng: jax.Array, logits_BxV: jax.Array, seen_BxV: jax.Array,
           params: SamplingParams) -> jax.Array:
    """The next token of each row: a sample, or the argmax when temperature is 0."""
    def greedy():
        penalised = repetition_penalty(logits_BxV, seen_BxV, params.repetition_penalty)
        return jnp.argmax(penalised, axis=-1).astype(jnp.int32)

    def sampled():
        return jax.random.categorical(rng, process(logits_BxV, seen_BxV, params),
                                      axis=-1).astype(jnp.int32)

    # A real branch: greedy decoding skips the sorts of top-k / top-p.
    return jax.lax.cond(params.temperature > 0, sampled, greedy)
