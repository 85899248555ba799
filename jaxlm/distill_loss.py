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

The logits of both models exist only for `chunk_tokens` tokens at a time: the chunks are a
`lax.scan` whose body is rematerialised (`jax.checkpoint`), so the backward pass recomputes each
chunk's logits instead of keeping a [B, L, V] array. The teacher gets no gradient.
`divergence_BxL` is the same per-token divergence on materialised logits, the reference the
tests compare against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.loss import _chunk_len, _chunk_logits, _HeadSpec

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
                 chunk_tokens: int = 512) -> dict[str, jax.Array]:
    """Masked sums {nll_sum, kd_sum, correct, num_tokens} over [B, L], chunked over L.

    hidden/head: the student's final hidden states and vocab head (rows = its padded vocab);
    teacher_*: the teacher's (its own width E, same padded vocab rows). Differentiable in the
    student's hidden and head only.
    """
    b, length, _ = hidden_BxLxD.shape
    chunk_len = _chunk_len(length, max(1, chunk_tokens // b))
    n = length // chunk_len
    head_spec = _HeadSpec(0.0, vocab_size)
    teacher_hidden_BxLxE = jax.lax.stop_gradient(teacher_hidden_BxLxE)
    teacher_head_ExV = jax.lax.stop_gradient(teacher_head_VxE).T
    mask_BxL = mask_BxL.astype(jnp.float32)

    def chunked(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [L/chunk, B, chunk, ...]
        return jnp.swapaxes(a.reshape(b, n, chunk_len, *a.shape[2:]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(head_DxV, x_BxCxD, tx_BxCxE, t_BxC, m_BxC):
        s = _chunk_logits(head_spec, x_BxCxD, head_DxV)
        te = _chunk_logits(head_spec, tx_BxCxE, teacher_head_ExV)
        nll, hit = _ce_BxL(s, t_BxC)
        kd = divergence_BxL(spec, s, te)
        return jnp.stack([jnp.sum(nll * m_BxC), jnp.sum(kd * m_BxC), jnp.sum(hit * m_BxC)])

    head_DxV = head_VxD.T

    def body(acc, chunk):
        return acc + chunk_sums(head_DxV, *chunk), None

    chunks = (chunked(hidden_BxLxD), chunked(teacher_hidden_BxLxE), chunked(targets_BxL),
              chunked(mask_BxL))
    sums = jax.lax.scan(body, jnp.zeros((3,), jnp.float32), chunks)[0]
    return {"nll_sum": sums[0], "kd_sum": sums[1], "correct": jax.lax.stop_gradient(sums[2]),
            "num_tokens": jnp.sum(mask_BxL)}
