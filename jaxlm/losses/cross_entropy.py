"""Token-level losses shared by the stages.

Two ways to get the same numbers:

* `cross_entropy_sum(logits, ...)`: from materialised logits [B, L, V].
* `fused_cross_entropy_sum(hidden, head, ...)`: from the final hidden states and the vocab head.
  The logits are built chunk by chunk (a few hundred tokens at a time) and never exist as a whole
  [B*L, V] array; the gradient is computed in the same pass. On CPU this removes several
  [B*L, V] float32 temporaries (logits, exp, its transpose, the gradient) whose fresh pages and
  memory traffic cost more than the head matmuls themselves.

`token_logps(hidden, head, targets)` gives the per-token log p(target) [B, L] (and optionally the
entropy) the same chunked way, with a backward pass that recomputes each chunk's logits; the
sequence-level losses (DPO, scoring, RL) build on it. `token_logps_and_hits` is its forward-only
twin for evaluation: the same log-probs and whether each target is the greedy choice.

Both take `logit_softcap` (`ModelConfig.final_logit_softcap`): the logits they build are then
C * tanh(logits / C), as the model's head returns them, and their backward passes include the
factor 1 - tanh^2.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxlm.models.softcap import softcap, softcap_grad
from jaxlm.parallel import sharding

_LOGITS = ("act_batch", "act_length", "act_vocab")


def cross_entropy_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array,
                      z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over masked tokens of -log p(target) (+ z_loss * log(Z)^2), in float32.

    Returns (loss_sum, aux) with aux = {nll_sum, z_loss_sum, num_tokens, correct}; divide by
    num_tokens for means. Summing (not averaging) keeps microbatches and hosts exact to combine.
    The backward pass (`_ce_sums`) builds d logits in one elementwise pass, where autodiff
    would scatter the one-hot term and make several passes over the [B, L, V] logits.
    """
    logits = logits_BxLxV.astype(jnp.float32)
    mask = mask_BxL.astype(jnp.float32)
    nll_sum, z_sum, correct = _ce_sums(logits, targets_BxL, mask)
    aux = {"nll_sum": nll_sum, "z_loss_sum": z_sum, "num_tokens": jnp.sum(mask),
           "correct": correct}
    return nll_sum + z_loss * z_sum, aux


def _token_stats(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
    """log Z, -log p(target) and argmax == target, each [B, L], from float32 logits."""
    max_BxL = jnp.max(logits_BxLxV, axis=-1)
    log_z_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits_BxLxV - max_BxL[..., None]), axis=-1))
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    hit_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return log_z_BxL, log_z_BxL - target_BxL, hit_BxL


def _masked_sums(log_z_BxL, nll_BxL, hit_BxL, mask_BxL) -> jax.Array:
    """[nll_sum, z_sum, correct]."""
    return jnp.stack([jnp.sum(nll_BxL * mask_BxL), jnp.sum(jnp.square(log_z_BxL) * mask_BxL),
                      jnp.sum(hit_BxL * mask_BxL)])


def _dlogits(logits_BxLxV, log_z_BxL, targets_BxL, mask_BxL, coef_nll, coef_z):
    """d(coef_nll * nll_sum + coef_z * z_sum) / d logits, float32.

    d nll / d logits = softmax - onehot(target); d log(Z)^2 / d logits = 2 log(Z) softmax.
    """
    scale_BxL = mask_BxL * (coef_nll + 2.0 * coef_z * log_z_BxL)
    probs = jnp.exp(logits_BxLxV - log_z_BxL[..., None])
    onehot = jnp.arange(logits_BxLxV.shape[-1]) == targets_BxL[..., None]
    return probs * scale_BxL[..., None] - jnp.where(onehot, (coef_nll * mask_BxL)[..., None], 0.0)


@jax.custom_vjp
def _ce_sums(logits_BxLxV, targets_BxL, mask_BxL):
    """(nll_sum, z_sum, correct) of float32 logits."""
    sums = _masked_sums(*_token_stats(logits_BxLxV, targets_BxL), mask_BxL)
    return sums[0], sums[1], sums[2]


def _ce_sums_fwd(logits_BxLxV, targets_BxL, mask_BxL):
    log_z_BxL, nll_BxL, hit_BxL = _token_stats(logits_BxLxV, targets_BxL)
    sums = _masked_sums(log_z_BxL, nll_BxL, hit_BxL, mask_BxL)
    res = (logits_BxLxV, targets_BxL, mask_BxL, log_z_BxL, nll_BxL, hit_BxL)
    return (sums[0], sums[1], sums[2]), res


def _ce_sums_bwd(res, cts):
    logits_BxLxV, targets_BxL, mask_BxL, log_z_BxL, nll_BxL, hit_BxL = res
    g_nll, g_z, g_correct = cts
    d_logits = _dlogits(logits_BxLxV, log_z_BxL, targets_BxL, mask_BxL, g_nll, g_z)
    d_mask = g_nll * nll_BxL + g_z * jnp.square(log_z_BxL) + g_correct * hit_BxL
    return sharding.constrain(d_logits, _LOGITS), None, d_mask


_ce_sums.defvjp(_ce_sums_fwd, _ce_sums_bwd)


def fused_cross_entropy_sum(hidden_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                            mask_BxL: jax.Array, z_loss: float = 0.0, *,
                            vocab_size: int | None = None, chunk_tokens: int = 512,
                            logit_softcap: float = 0.0
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`cross_entropy_sum` of the logits `hidden @ head.T`, without materialising them.

    Equals `cross_entropy_sum(logits, targets, mask, z_loss)` where logits are what
    `Transformer` returns: `einsum(hidden, head)` in the compute dtype, cast to float32,
    soft-capped (`logit_softcap` > 0), entries `>= vocab_size` set to -1e9. The logits exist
    only for `chunk_tokens` tokens (a slice of the sequence over the whole batch) at a time.

    Under `jax.grad` the gradient w.r.t. hidden and head is produced in the forward pass (three
    head matmuls per token, like plain autodiff, and no [B*L, V] array is kept); the backward
    pass only scales it. Gradients of the aux sums are exact too (they recompute the chunks).
    targets and mask are treated as constants (zero cotangent).

    Args:
      hidden_BxLxD: final-norm hidden states in the compute dtype.
      head_VxD: output projection (the embedding when tied), rows = padded vocab.
      targets_BxL, mask_BxL, z_loss: as in `cross_entropy_sum`.
      vocab_size: real vocabulary size (<= V); None means V.
      chunk_tokens: tokens per chunk (B * chunk length); the chunk length divides L.
      logit_softcap: C > 0: the logits are C * tanh(logits / C) (model.final_logit_softcap).
    """
    b, length, _ = hidden_BxLxD.shape
    vocab = head_VxD.shape[0]
    vocab_size = vocab if vocab_size is None else vocab_size
    chunk_len = _chunk_len(length, max(1, chunk_tokens // b))
    n = length // chunk_len

    def chunked(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [L/chunk, B, chunk, ...]
        return jnp.swapaxes(a.reshape(b, n, chunk_len, *a.shape[2:]), 0, 1)

    spec = _HeadSpec(float(z_loss), vocab_size, float(logit_softcap))
    loss_sum, nll_sum, z_sum, correct = _fused_ce(
        spec, chunked(hidden_BxLxD), head_VxD, chunked(targets_BxL),
        chunked(mask_BxL.astype(jnp.float32)))
    aux = {"nll_sum": nll_sum, "z_loss_sum": z_sum,
           "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32)), "correct": correct}
    return loss_sum, aux


def _chunk_len(length: int, target: int) -> int:
    """Largest divisor of `length` that is <= target."""
    best = 1
    for c in range(1, min(length, target) + 1):
        if length % c == 0:
            best = c
    return best


class _HeadSpec(NamedTuple):
    """Static settings of the fused loss (a hashable custom_vjp argument)."""

    z_loss: float
    vocab_size: int
    softcap: float = 0.0  # C * tanh(logits / C) when > 0
    temperature: float = 1.0  # the (capped) logits divided by this


def _chunk_logits(spec: _HeadSpec, x_BxCxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    """float32 logits of one chunk, exactly as the model's head computes them (divided by
    spec.temperature when it is not 1)."""
    logits = jnp.einsum("bcd,dv->bcv", x_BxCxD, head_DxV).astype(jnp.float32)
    logits = softcap(logits, spec.softcap)
    if spec.temperature != 1.0:
        logits = logits / spec.temperature
    logits = sharding.constrain(logits, _LOGITS)
    if spec.vocab_size != head_DxV.shape[1]:
        real_V = jnp.arange(head_DxV.shape[1]) < spec.vocab_size
        logits = jnp.where(real_V, logits, -1e9)
    return logits


def _chunk_stats(logits_BxCxV: jax.Array, t_BxC: jax.Array, m_BxC: jax.Array):
    """Per-chunk log Z [B, C] and the chunk's (nll, z, correct) sums."""
    log_z_BxC, nll_BxC, hit_BxC = _token_stats(logits_BxCxV, t_BxC)
    return log_z_BxC, _masked_sums(log_z_BxC, nll_BxC, hit_BxC, m_BxC)


def _chunk_dlogits(spec: _HeadSpec, logits_BxCxV, log_z_BxC, t_BxC, m_BxC, coef_nll, coef_z):
    """`_dlogits` of one chunk; padded vocab entries get none (the -1e9 `where` blocks it)."""
    d = _dlogits(logits_BxCxV, log_z_BxC, t_BxC, m_BxC, coef_nll, coef_z)
    if spec.vocab_size != logits_BxCxV.shape[-1]:
        d = jnp.where(jnp.arange(logits_BxCxV.shape[-1]) < spec.vocab_size, d, 0.0)
    return sharding.constrain(d, _LOGITS)


def _through_softcap(spec: _HeadSpec, logits_BxCxV: jax.Array, d_BxCxV: jax.Array
                     ) -> jax.Array:
    """d/d (the head's logits, before the soft-cap and the temperature) from d/d `logits`
    (as `_chunk_logits` returns them): divided by the temperature, times 1 - tanh^2 of the
    capped logits. (Padded entries have d = 0 and a finite factor, so they stay 0.)"""
    t = spec.temperature
    if t != 1.0:
        d_BxCxV = d_BxCxV / t
    if not spec.softcap:
        return d_BxCxV
    capped = logits_BxCxV * t if t != 1.0 else logits_BxCxV
    return sharding.constrain(d_BxCxV * softcap_grad(capped, spec.softcap), _LOGITS)


def _head_grads(x_BxCxD: jax.Array, head_VxD: jax.Array, d_BxCxV: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """d/d x [B, C, D] and the float32 d/d head^T [D, V] of one chunk, from d logits."""
    d = d_BxCxV.astype(x_BxCxD.dtype)
    dx_BxCxD = jnp.einsum("bcv,vd->bcd", d, head_VxD)
    # x^T as its own array keeps this dot in the fast (row-major, untransposed) form.
    x_DxT = jax.lax.optimization_barrier(x_BxCxD.reshape(-1, x_BxCxD.shape[-1]).T)
    dhead_DxV = jnp.dot(x_DxT, d.reshape(-1, d.shape[-1]), preferred_element_type=jnp.float32)
    return dx_BxCxD, dhead_DxV


def _scan_chunks(spec: _HeadSpec, x_NxBxCxD, head_VxD, t_NxBxC, m_NxBxC, coefs=None):
    """Loops over the chunks; returns the (nll, z, correct) sums and, if `coefs`, gradients.

    With coefs = (coef_nll, coef_z) it also returns d/d hidden [N, B, C, D] and d/d head [V, D]
    of coef_nll * nll_sum + coef_z * z_sum.
    """
    head_DxV = head_VxD.T

    def stats_only(sums, chunk):
        x_BxCxD, t_BxC, m_BxC = chunk
        _, chunk_sums = _chunk_stats(_chunk_logits(spec, x_BxCxD, head_DxV), t_BxC, m_BxC)
        return sums + chunk_sums, None

    def with_grads(carry, chunk):
        sums, dhead_DxV = carry
        x_BxCxD, t_BxC, m_BxC = chunk
        logits = _chunk_logits(spec, x_BxCxD, head_DxV)
        log_z_BxC, chunk_sums = _chunk_stats(logits, t_BxC, m_BxC)
        d = _chunk_dlogits(spec, logits, log_z_BxC, t_BxC, m_BxC, *coefs)
        d = _through_softcap(spec, logits, d)
        dx_BxCxD, dhead_chunk_DxV = _head_grads(x_BxCxD, head_VxD, d)
        return (sums + chunk_sums, dhead_DxV + dhead_chunk_DxV), dx_BxCxD

    sums0 = jnp.zeros((3,), jnp.float32)
    chunks = (x_NxBxCxD, t_NxBxC, m_NxBxC)
    if coefs is None:
        return jax.lax.scan(stats_only, sums0, chunks)[0]
    init = (sums0, jnp.zeros(head_DxV.shape, jnp.float32))
    (sums, dhead_DxV), dx = jax.lax.scan(with_grads, init, chunks)
    return sums, dx, dhead_DxV.T.astype(head_VxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ce(spec, x_NxBxCxD, head_VxD, t_NxBxC, m_NxBxC):
    """(loss_sum, nll_sum, z_sum, correct) over chunked inputs; see fused_cross_entropy_sum."""
    sums = _scan_chunks(spec, x_NxBxCxD, head_VxD, t_NxBxC, m_NxBxC)
    return sums[0] + spec.z_loss * sums[1], sums[0], sums[1], sums[2]


def _fused_ce_fwd(spec, x, head, t, m):
    x, head, t, m = x.value, head.value, t.value, m.value
    sums, dx, dhead = _scan_chunks(spec, x, head, t, m, coefs=(1.0, spec.z_loss))
    out = (sums[0] + spec.z_loss * sums[1], sums[0], sums[1], sums[2])
    return out, (x, head, t, m, dx, dhead)


def _fused_ce_bwd(spec, res, cts):
    x, head, t, m, dx, dhead = res
    g_loss, g_nll, g_z, _ = cts  # `correct` is piecewise constant: no gradient
    zero = lambda g: isinstance(g, SymbolicZero)
    if zero(g_nll) and zero(g_z):  # the usual case: only the loss is differentiated
        g = jnp.zeros((), jnp.float32) if zero(g_loss) else g_loss
        dx_out, dhead_out = (dx * g).astype(x.dtype), (dhead * g).astype(head.dtype)
    else:  # aux sums differentiated too: recompute the chunks with the combined coefficients
        as_f32 = lambda g: jnp.zeros((), jnp.float32) if zero(g) else g
        coef_nll = as_f32(g_loss) + as_f32(g_nll)
        coef_z = spec.z_loss * as_f32(g_loss) + as_f32(g_z)
        _, dx_out, dhead_out = _scan_chunks(spec, x, head, t, m, coefs=(coef_nll, coef_z))
    return dx_out, dhead_out, None, jnp.zeros_like(m)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


def token_logps(hidden_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array, *,
                vocab_size: int | None = None, chunk_tokens: int = 512,
                with_entropy: bool = False, logit_softcap: float = 0.0,
                temperature: float = 1.0) -> jax.Array | tuple[jax.Array, jax.Array]:
    """float32 log p(target) per position [B, L] of the logits `hidden @ head.T`, chunked.

    Equals `take_along_axis(log_softmax(logits), targets)` on the logits `Transformer` returns
    (soft-capped by `logit_softcap` > 0, padded vocab entries `>= vocab_size` at -1e9), but the
    logits exist only for `chunk_tokens` tokens at a time, in the forward and in the backward
    pass: the gradient w.r.t. hidden and head recomputes each chunk's logits and applies
    d logits = ct * (onehot(target) - softmax) (plus the entropy term if asked for; times
    1 - tanh^2 under a soft-cap), so the
    sequence losses of DPO, reward-free scoring and RL never hold a [B, L, V] float32 array.

    Args:
      hidden_BxLxD: final-norm hidden states in the compute dtype.
      head_VxD: output projection (the embedding when tied), rows = padded vocab.
      targets_BxL: token ids whose log-probabilities are wanted (constants: no gradient).
      vocab_size: real vocabulary size (<= V); None means V.
      chunk_tokens: tokens per chunk (B * chunk length); when the chunk length does not
        divide L the last chunk is padded (the padding is cut from the result).
      with_entropy: also return the entropy of each position's distribution [B, L]
        (differentiable too), at the cost of one more pass over each chunk's logits.
      logit_softcap: C > 0: the logits are C * tanh(logits / C) (model.final_logit_softcap).
      temperature: T: log-probs (and entropy) of softmax(logits / T), the distribution a
        sampler at temperature T draws from (RL's ratios and KL terms).
    """
    vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
    chunked, unchunked = _sequence_chunks(*targets_BxL.shape, chunk_tokens)
    spec = _HeadSpec(0.0, vocab_size, float(logit_softcap), float(temperature))
    outs = _fused_logps(spec, with_entropy, chunked(hidden_BxLxD), head_VxD,
                        chunked(targets_BxL))
    if with_entropy:
        return unchunked(outs[0]), unchunked(outs[1])
    return unchunked(outs[0])


def token_logps_and_hits(hidden_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                         *, vocab_size: int | None = None, chunk_tokens: int = 512,
                         logit_softcap: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Forward only: `token_logps` [B, L] and whether each target is the argmax of its logits
    [B, L] (greedy decoding would pick it; ties go to the lower id, as `jnp.argmax`), from one
    pass over each chunk's logits. No custom gradient: for scoring, not for training."""
    vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
    chunked, unchunked = _sequence_chunks(*targets_BxL.shape, chunk_tokens)
    spec = _HeadSpec(0.0, vocab_size, float(logit_softcap))
    head_DxV = head_VxD.T

    def body(_, chunk):
        x_BxCxD, t_BxC = chunk
        logits = _chunk_logits(spec, x_BxCxD, head_DxV)
        logp_BxC, _, _ = _chunk_logps(logits, t_BxC, with_entropy=False)
        return None, (logp_BxC, _is_first_argmax(logits, t_BxC))

    logp, hit = jax.lax.scan(body, None, (chunked(hidden_BxLxD), chunked(targets_BxL)))[1]
    return unchunked(logp), unchunked(hit)


def _is_first_argmax(logits_BxCxV: jax.Array, t_BxC: jax.Array) -> jax.Array:
    """argmax(logits) == t [B, C] (ties to the lower id), as the target's logit being the
    largest with no lower id reaching it: two plain reductions, where XLA:CPU's variadic
    argmax reduction is about 10x slower than either."""
    target_BxCx1 = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)
    earlier_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) < t_BxC[..., None]
    tied_BxC = jnp.sum((earlier_BxCxV & (logits_BxCxV >= target_BxCx1)).astype(jnp.float32),
                       axis=-1)
    return (target_BxCx1[..., 0] >= jnp.max(logits_BxCxV, axis=-1)) & (tied_BxC == 0)


def _sequence_chunks(b: int, length: int, chunk_tokens: int):
    """(chunked, unchunked): [B, L, ...] <-> [N, B, C, ...] in N chunks of C positions with
    B * C <= chunk_tokens; when C does not divide L the last chunk is padded with zeros (and
    the padding cut again by `unchunked`)."""
    n = -(-length // min(length, max(1, chunk_tokens // b)))
    chunk_len = -(-length // n)  # the smallest chunk length that needs n chunks
    pad = n * chunk_len - length

    def chunked(a: jax.Array) -> jax.Array:
        if pad:
            a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.swapaxes(a.reshape(b, n, chunk_len, *a.shape[2:]), 0, 1)

    def unchunked(a_NxBxC: jax.Array) -> jax.Array:
        return jnp.swapaxes(a_NxBxC, 0, 1).reshape(b, n * chunk_len)[:, :length]

    return chunked, unchunked


def _chunk_logps(logits: jax.Array, t_BxC: jax.Array, with_entropy: bool):
    """One chunk's log p(target), log Z and (with_entropy) E_p[logits], each [B, C], from its
    float32 logits [B, C, V]."""
    max_BxC = jnp.max(logits, axis=-1)
    log_z_BxC = max_BxC + jnp.log(jnp.sum(jnp.exp(logits - max_BxC[..., None]), axis=-1))
    target_BxC = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
    mean_BxC = None
    if with_entropy:  # padded entries: p = exp(-1e9 - log Z) = 0, so they add nothing
        mean_BxC = jnp.sum(jnp.exp(logits - log_z_BxC[..., None]) * logits, axis=-1)
    return target_BxC - log_z_BxC, log_z_BxC, mean_BxC


def _scan_logps(spec: _HeadSpec, with_entropy: bool, x_NxBxCxD, head_VxD, t_NxBxC):
    """(log p(target), log Z, E_p[logits] or None), each [N, B, C], chunk by chunk."""
    head_DxV = head_VxD.T

    def body(_, chunk):
        x_BxCxD, t_BxC = chunk
        logits = _chunk_logits(spec, x_BxCxD, head_DxV)
        logp, log_z, mean = _chunk_logps(logits, t_BxC, with_entropy)
        return None, (logp, log_z, mean)

    return jax.lax.scan(body, None, (x_NxBxCxD, t_NxBxC))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_logps(spec, with_entropy, x_NxBxCxD, head_VxD, t_NxBxC):
    """(log p(target),) or (log p(target), entropy), each [N, B, C]; see token_logps."""
    logp, log_z, mean = _scan_logps(spec, with_entropy, x_NxBxCxD, head_VxD, t_NxBxC)
    return (logp, log_z - mean) if with_entropy else (logp,)


def _fused_logps_fwd(spec, with_entropy, x, head, t):
    logp, log_z, mean = _scan_logps(spec, with_entropy, x, head, t)
    out = (logp, log_z - mean) if with_entropy else (logp,)
    return out, (x, head, t, log_z, mean)


def _fused_logps_bwd(spec, with_entropy, res, cts):
    """Recomputes each chunk's logits: d logits = ct_logp * (onehot - p)
    - ct_entropy * p * (logits - E_p[logits]), then the head matmuls' gradients."""
    x, head, t, log_z, mean = res
    head_DxV = head.T

    def body(dhead_DxV, chunk):
        x_BxCxD, t_BxC, log_z_BxC, ct_BxC, *entropy = chunk
        logits = _chunk_logits(spec, x_BxCxD, head_DxV)
        # _dlogits of the nll weighted by -ct: ct * (onehot - softmax), padded entries zeroed.
        d = _chunk_dlogits(spec, logits, log_z_BxC, t_BxC, ct_BxC, -1.0, 0.0)
        if entropy:
            mean_BxC, ct_ent_BxC = entropy
            probs = jnp.exp(logits - log_z_BxC[..., None])
            d = d - probs * (ct_ent_BxC[..., None] * (logits - mean_BxC[..., None]))
            d = sharding.constrain(d, _LOGITS)
        d = _through_softcap(spec, logits, d)
        dx_BxCxD, dhead_chunk_DxV = _head_grads(x_BxCxD, head, d)
        return dhead_DxV + dhead_chunk_DxV, dx_BxCxD

    chunks = (x, t, log_z, cts[0]) + ((mean, cts[1]) if with_entropy else ())
    dhead_DxV, dx = jax.lax.scan(body, jnp.zeros(head_DxV.shape, jnp.float32), chunks)
    return dx.astype(x.dtype), dhead_DxV.T.astype(head.dtype), None


_fused_logps.defvjp(_fused_logps_fwd, _fused_logps_bwd)
