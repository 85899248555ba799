"""Knowledge-distillation losses between a student's and a teacher's next-token distributions.

`distill_sums(student hidden, student head, teacher hidden, teacher head, targets, mask)` gives
the summed hard-label cross-entropy and the summed divergence between the temperature-softened
teacher distribution p = softmax(t / T) and student distribution q = softmax(s / T):

* "forward": KL(p || q), scaled by T^2 so its gradient keeps the size of the hard loss's as T
  grows (Hinton et al., 2015); with `top_k` > 0 the teacher keeps only its k largest logits
  (p renormalised over them), for large vocabularies.
* "reverse": KL(q || p), mode-seeking, scaled by T^2.
* "jsd": the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024),
  beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, scaled by T^2.

The logits of both models exist only for `chunk_tokens` tokens at a time (a `lax.scan` over
chunks), and the gradient of the training objective is built in the same pass from closed
forms, as `jaxlm.losses.cross_entropy.fused_cross_entropy_sum` does: no [B, L, V] array is kept for
the
backward pass. The teacher gets no gradient.
`divergence_BxL` is the same per-token divergence on materialised logits, the reference the
tests compare against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxlm.losses.cross_entropy import (
    _LOGITS,
    _chunk_len,
    _chunk_logits,
    _head_grads,
    _HeadSpec,
    _through_softcap,
)
from jaxlm.parallel import sharding

KINDS = ("forward", "reverse", "jsd")


class DistillSpec(NamedTuple):
    """Static settings of the divergence."""

    kind: str = "forward"
    temperature: float = 1.0
    beta: float = 0.5  # jsd only: the teacher's weight in the mixture m
    top_k: int = 0  # forward only: keep the teacher's k largest logits (0: all)


def divergence_BxL(spec: DistillSpec, student_BxLxV: jax.Array, teacher_BxLxV: jax.Array
                   ) -> jax.Array:
    """T^2 * D(teacher, student) per position, float32, from logits (padded entries at -1e9)."""
    t = spec.temperature
    s = student_BxLxV.astype(jnp.float32) / t
    te = jax.lax.stop_gradient(teacher_BxLxV.astype(jnp.float32)) / t
    if spec.top_k:
        kth_BxLx1 = jax.lax.top_k(te, spec.top_k)[0][..., -1:]
        te = jnp.where(te >= kth_BxLx1, te, -1e9)
    logq = jax.nn.log_softmax(s, axis=-1)
    logp = jax.nn.log_softmax(te, axis=-1)
    p, q = jnp.exp(logp), jnp.exp(logq)
    if spec.kind == "forward":
        d = jnp.sum(p * (logp - logq), axis=-1)
    elif spec.kind == "reverse":
        d = jnp.sum(q * (logq - logp), axis=-1)
    else:  # log m in log space: finite where p = q = 0 (padded vocab entries)
        b = spec.beta
        logm = jnp.logaddexp(jnp.log(b) + logp, jnp.log1p(-b) + logq)
        d = b * jnp.sum(p * (logp - logm), axis=-1) + (1 - b) * jnp.sum(q * (logq - logm), axis=-1)
    return (t * t) * d


def _ce_BxL(student_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-log q(target) at T = 1 and argmax == target, each [B, L]."""
    logq = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logq, targets_BxL[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(student_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return nll, hit


def distill_sums(spec: DistillSpec, hidden_BxLxD: jax.Array, head_VxD: jax.Array,
                 teacher_hidden_BxLxE: jax.Array, teacher_head_VxE: jax.Array,
                 targets_BxL: jax.Array, mask_BxL: jax.Array, *, vocab_size: int,
                 alpha: float = 0.5, chunk_tokens: int = 512, logit_softcap: float = 0.0,
                 teacher_logit_softcap: float = 0.0) -> dict[str, jax.Array]:
    """Masked sums {loss_sum, nll_sum, kd_sum, correct, num_tokens} over [B, L], chunked over
    L, where loss_sum = alpha * nll_sum + (1 - alpha) * kd_sum.

    hidden/head: the student's final hidden states and vocab head (rows = its padded vocab);
    teacher_*: the teacher's (its own width E, same padded vocab rows). Differentiable in the
    student's hidden and head only. As in `fused_cross_entropy_sum`, the gradient of loss_sum
    is produced in the forward pass from closed forms (d nll / d s = softmax(s) - onehot;
    d (T^2 D) / d s = T q (g - <q, g>) with g = dD/dq), so each chunk's logits are built once;
    gradients of nll_sum or kd_sum alone recompute the chunks. `logit_softcap` and
    `teacher_logit_softcap` soft-cap each model's logits as its head does
    (model.final_logit_softcap).
    """
    b, length, _ = hidden_BxLxD.shape
    chunk_len = _chunk_len(length, max(1, chunk_tokens // b))
    n = length // chunk_len

    def chunked(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [L/chunk, B, chunk, ...]
        return jnp.swapaxes(a.reshape(b, n, chunk_len, *a.shape[2:]), 0, 1)

    mask_BxL = mask_BxL.astype(jnp.float32)
    fused = _FusedSpec(spec, _HeadSpec(0.0, vocab_size, float(logit_softcap)), float(alpha),
                       _HeadSpec(0.0, vocab_size, float(teacher_logit_softcap)))
    loss_sum, nll_sum, kd_sum, correct = _fused_distill(
        fused, chunked(hidden_BxLxD), head_VxD,
        chunked(jax.lax.stop_gradient(teacher_hidden_BxLxE)),
        jax.lax.stop_gradient(teacher_head_VxE), chunked(targets_BxL), chunked(mask_BxL))
    return {"loss_sum": loss_sum, "nll_sum": nll_sum, "kd_sum": kd_sum,
            "correct": jax.lax.stop_gradient(correct), "num_tokens": jnp.sum(mask_BxL)}


class _FusedSpec(NamedTuple):
    """Static settings of the fused loss (a hashable custom_vjp argument)."""

    distill: DistillSpec
    head: _HeadSpec
    alpha: float
    teacher_head: _HeadSpec


def _log_softmax(x: jax.Array) -> jax.Array:
    max_ = jnp.max(x, axis=-1, keepdims=True)
    return x - (max_ + jnp.log(jnp.sum(jnp.exp(x - max_), axis=-1, keepdims=True)))


def _chunk(fs: _FusedSpec, x_BxCxD, head_DxV, tx_BxCxE, thead_ExV, t_BxC, m_BxC, coefs=None):
    """One chunk's [nll, kd, correct] sums and, with coefs = (c_nll, c_kd), the gradient of
    c_nll * nll_sum + c_kd * kd_sum w.r.t. the chunk's float32 student logits."""
    spec, temp = fs.distill, fs.distill.temperature
    s = _chunk_logits(fs.head, x_BxCxD, head_DxV)
    te = _chunk_logits(fs.teacher_head, tx_BxCxE, thead_ExV) / temp
    logs = _log_softmax(s)
    nll_BxC = -jnp.take_along_axis(logs, t_BxC[..., None], axis=-1)[..., 0]
    hit_BxC = (jnp.argmax(s, axis=-1) == t_BxC).astype(jnp.float32)
    if spec.top_k:
        kth_BxCx1 = jax.lax.top_k(te, spec.top_k)[0][..., -1:]
        te = jnp.where(te >= kth_BxCx1, te, -1e9)
    logq = _log_softmax(s / temp)
    logp = _log_softmax(te)
    q, p = jnp.exp(logq), jnp.exp(logp)
    if spec.kind == "forward":
        d_BxC = jnp.sum(p * (logp - logq), axis=-1)
    elif spec.kind == "reverse":
        d_BxC = jnp.sum(q * (logq - logp), axis=-1)
    else:
        beta = spec.beta
        logm = jnp.logaddexp(jnp.log(beta) + logp, jnp.log1p(-beta) + logq)
        d_BxC = (beta * jnp.sum(p * (logp - logm), axis=-1)
                 + (1 - beta) * jnp.sum(q * (logq - logm), axis=-1))
    sums = jnp.stack([jnp.sum(nll_BxC * m_BxC), temp * temp * jnp.sum(d_BxC * m_BxC),
                      jnp.sum(hit_BxC * m_BxC)])
    if coefs is None:
        return sums, None
    c_nll, c_kd = coefs
    onehot = jnp.arange(s.shape[-1]) == t_BxC[..., None]
    d_ce = jnp.exp(logs) - onehot
    if spec.kind == "forward":  # dD/da with a = s / T, through the softmax q
        d_a = q - p
    elif spec.kind == "reverse":
        d_a = q * (logq - logp - d_BxC[..., None])
    else:
        g = (1 - spec.beta) * (logq - logm)
        d_a = q * (g - jnp.sum(q * g, axis=-1, keepdims=True))
    d = m_BxC[..., None] * (c_nll * d_ce + (c_kd * temp) * d_a)
    if fs.head.vocab_size != s.shape[-1]:
        d = jnp.where(jnp.arange(s.shape[-1]) < fs.head.vocab_size, d, 0.0)
    return sums, _through_softcap(fs.head, s, sharding.constrain(d, _LOGITS))


def _scan(fs: _FusedSpec, x, head_VxD, tx, thead_VxE, t, m, coefs=None):
    """The [nll, kd, correct] sums over the chunks; with coefs also d/d hidden and d/d head."""
    head_DxV, thead_ExV = head_VxD.T, thead_VxE.T

    def stats_only(sums, chunk):
        return sums + _chunk(fs, chunk[0], head_DxV, chunk[1], thead_ExV, *chunk[2:])[0], None

    def with_grads(carry, chunk):
        sums, dhead_DxV = carry
        x_BxCxD = chunk[0]
        chunk_sums, d = _chunk(fs, x_BxCxD, head_DxV, chunk[1], thead_ExV, *chunk[2:],
                               coefs=coefs)
        dx_BxCxD, dhead_chunk_DxV = _head_grads(x_BxCxD, head_VxD, d)
        return (sums + chunk_sums, dhead_DxV + dhead_chunk_DxV), dx_BxCxD

    sums0 = jnp.zeros((3,), jnp.float32)
    if coefs is None:
        return jax.lax.scan(stats_only, sums0, (x, tx, t, m))[0]
    init = (sums0, jnp.zeros(head_DxV.shape, jnp.float32))
    (sums, dhead_DxV), dx = jax.lax.scan(with_grads, init, (x, tx, t, m))
    return sums, dx, dhead_DxV.T.astype(head_VxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_distill(fs, x, head, tx, thead, t, m):
    """(loss_sum, nll_sum, kd_sum, correct) over chunked inputs; see distill_sums."""
    sums = _scan(fs, x, head, tx, thead, t, m)
    return fs.alpha * sums[0] + (1 - fs.alpha) * sums[1], sums[0], sums[1], sums[2]


def _fused_distill_fwd(fs, x, head, tx, thead, t, m):
    x, head, tx, thead, t, m = (a.value for a in (x, head, tx, thead, t, m))
    sums, dx, dhead = _scan(fs, x, head, tx, thead, t, m, coefs=(fs.alpha, 1 - fs.alpha))
    out = (fs.alpha * sums[0] + (1 - fs.alpha) * sums[1], sums[0], sums[1], sums[2])
    return out, (x, head, tx, thead, t, m, dx, dhead)


def _fused_distill_bwd(fs, res, cts):
    x, head, tx, thead, t, m, dx, dhead = res
    g_loss, g_nll, g_kd, _ = cts  # `correct` is piecewise constant: no gradient
    zero = lambda g: isinstance(g, SymbolicZero)  # noqa: E731
    as_f32 = lambda g: jnp.zeros((), jnp.float32) if zero(g) else g  # noqa: E731
    if zero(g_nll) and zero(g_kd):  # the training step: only loss_sum is differentiated
        g = as_f32(g_loss)
        dx_out, dhead_out = (dx * g).astype(x.dtype), (dhead * g).astype(head.dtype)
    else:
        coefs = (fs.alpha * as_f32(g_loss) + as_f32(g_nll),
                 (1 - fs.alpha) * as_f32(g_loss) + as_f32(g_kd))
        _, dx_out, dhead_out = _scan(fs, x, head, tx, thead, t, m, coefs=coefs)
    return (dx_out, dhead_out, jnp.zeros_like(tx), jnp.zeros_like(thead), None,
            jnp.zeros_like(m))


_fused_distill.defvjp(_fused_distill_fwd, _fused_distill_bwd, symbolic_zeros=True)
