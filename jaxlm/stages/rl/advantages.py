"""Advantages: group-relative (GRPO), generalised advantage estimation (PPO), whitening.

Pure jnp functions of arrays (they run on the host's NumPy arrays as well as inside jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.run.errors import ConfigError


def group_advantages(rewards_BxG: jax.Array, scale: str = "std", eps: float = 1e-4
                     ) -> jax.Array:
    """Each completion's reward minus its group's mean, divided by the group's std + eps or
    not: "std" the population std (GRPO, the default), "sample_std" the sample std with
    Bessel's correction (TRL's GRPOTrainer: torch's std), "none" no division (Dr. GRPO). A
    group whose completions all score the same gets 0 everywhere."""
    centred_BxG = rewards_BxG - rewards_BxG.mean(axis=1, keepdims=True)
    if scale == "none":
        return centred_BxG
    if scale not in ("std", "sample_std"):
        raise ConfigError(f"config key rl.advantage_scale: unknown {scale!r}")
    ddof = 1 if scale == "sample_std" else 0
    return centred_BxG / (rewards_BxG.std(axis=1, keepdims=True, ddof=ddof) + eps)


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's masked tokens (a contiguous prefix of
    the row): delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token),
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V), 0 off the mask."""
    mask_BxT = mask_BxT.astype(rewards_BxT.dtype)
    next_BxT = jnp.concatenate([values_BxT[:, 1:] * mask_BxT[:, 1:],
                                jnp.zeros_like(values_BxT[:, :1])], axis=1)
    delta_BxT = (rewards_BxT + gamma * next_BxT - values_BxT) * mask_BxT

    def back(carry_B, x):
        delta_B, m_B = x
        adv_B = (delta_B + gamma * lam * carry_B) * m_B
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(back, jnp.zeros_like(delta_BxT[:, 0]),
                              (delta_BxT.T, mask_BxT.T), reverse=True)
    adv_BxT = adv_TxB.T
    return adv_BxT, (adv_BxT + values_BxT) * mask_BxT


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries; 0 off the mask."""
    mask = mask.astype(x.dtype)
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    var = (jnp.square(x - mean) * mask).sum() / n
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask
