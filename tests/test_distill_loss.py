"""jaxlm/losses/distill.py: the divergences against numpy, their zero, the large-T limit of the
gradient, and the chunked sums (values and gradients) against the materialised logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.losses.distill import DistillSpec, distill_sums, divergence_BxL

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

B, L, V, D, E = 2, 12, 11, 8, 6  # E: the teacher's width


def _logits(seed, shape=(B, L, V), scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float64) * scale


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_divergence(kind, s, t, temperature, beta=0.5, top_k=0):
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 is 0 (the where)
        return _numpy_divergence_terms(kind, s, t, temperature, beta, top_k)


def _numpy_divergence_terms(kind, s, t, temperature, beta, top_k):
    s, t = s / temperature, t / temperature
    if top_k:
        kth = np.sort(t, axis=-1)[..., -top_k][..., None]
        t = np.where(t >= kth, t, -np.inf)
    p, q = _softmax(t), _softmax(s)
    lp, lq = np.log(p), np.log(q)
    kl = lambda a, la, lb: np.sum(np.where(a > 0, a * (la - lb), 0.0), axis=-1)
    if kind == "forward":
        d = kl(p, lp, lq)
    elif kind == "reverse":
        d = kl(q, lq, lp)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, lp, np.log(m)) + (1 - beta) * kl(q, lq, np.log(m))
    return temperature**2 * d


@pytest.mark.parametrize("kind,temperature,top_k", [
    ("forward", 1.0, 0), ("forward", 3.0, 0), ("forward", 2.0, 4), ("reverse", 2.0, 0),
    ("jsd", 1.0, 0), ("jsd", 2.5, 0)])
def test_divergence_matches_numpy_and_is_zero_on_itself(kind, temperature, top_k):
    s, t = _logits(0), _logits(1)
    spec = DistillSpec(kind=kind, temperature=temperature, beta=0.3, top_k=top_k)
    got = np.asarray(divergence_BxL(spec, jnp.asarray(s, jnp.float32),
                                    jnp.asarray(t, jnp.float32)))
    want = _numpy_divergence(kind, s, t, temperature, beta=0.3, top_k=top_k)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert np.all(want > 1e-3)
    if not top_k:  # the student equal to the teacher: nothing to learn
        same = divergence_BxL(spec, jnp.asarray(t, jnp.float32), jnp.asarray(t, jnp.float32))
        np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)


def test_forward_kl_gradient_at_large_temperature_is_logit_matching():
    """Hinton et al.: as T grows, d (T^2 KL) / d s_i -> ((s_i - mean s) - (t_i - mean t)) / V."""
    s, t = _logits(2, (V,), 1.0), _logits(3, (V,), 1.0)
    spec = DistillSpec(kind="forward", temperature=1000.0)
    grad = jax.grad(lambda x: divergence_BxL(spec, x, jnp.asarray(t, jnp.float32)))(
        jnp.asarray(s, jnp.float32))
    want = ((s - s.mean()) - (t - t.mean())) / V
    np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=2e-5)
    # ...and at T = 1 it is softmax(s) - softmax(t), far from the logit difference.
    grad1 = jax.grad(lambda x: divergence_BxL(DistillSpec(), x, jnp.asarray(t, jnp.float32)))(
        jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad1), _softmax(s) - _softmax(t), atol=1e-6)


@pytest.mark.parametrize("kind,top_k", [("forward", 0), ("forward", 3), ("reverse", 0),
                                        ("jsd", 0)])
def test_chunked_sums_equal_materialised_logits(kind, top_k):
    rng = np.random.default_rng(4)
    vocab = V - 2  # two padded rows, masked like the model's head masks them
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    tx = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    thead = jnp.asarray(rng.normal(size=(V, E)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, L)), jnp.int32)
    mask = jnp.asarray(rng.random((B, L)) > 0.3, jnp.float32)
    spec = DistillSpec(kind=kind, temperature=2.0, beta=0.3, top_k=top_k)

    def padded(logits):
        return jnp.where(jnp.arange(V) < vocab, logits, -1e9)

    def reference(x, head):
        s, t = padded(x @ head.T), padded(tx @ thead.T)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(s), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask), jnp.sum(divergence_BxL(spec, s, t) * mask)

    def chunked(x, head, chunk_tokens):
        sums = distill_sums(spec, x, head, tx, thead, targets, mask, vocab_size=vocab,
                            chunk_tokens=chunk_tokens)
        return sums["nll_sum"], sums["kd_sum"]

    want = reference(x, head)
    for chunk_tokens in (2 * 3, 2 * L):  # 4 chunks of 3 positions; one chunk
        got = chunked(x, head, chunk_tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
        obj = lambda f: lambda x, h: 0.3 * f(x, h)[0] + 0.7 * f(x, h)[1]
        g_got = jax.grad(obj(functools.partial(chunked, chunk_tokens=chunk_tokens)),
                         argnums=(0, 1))(x, head)
        g_want = jax.grad(obj(reference), argnums=(0, 1))(x, head)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # The training objective (loss_sum, gradient built in the forward pass) and its gradient.
    alpha = 0.3
    fused = lambda a, h: distill_sums(spec, a, h, tx, thead, targets, mask, vocab_size=vocab,  # noqa: E731
                                      alpha=alpha, chunk_tokens=6)["loss_sum"]
    ref_obj = lambda a, h: alpha * reference(a, h)[0] + (1 - alpha) * reference(a, h)[1]  # noqa: E731
    np.testing.assert_allclose(float(fused(x, head)), float(ref_obj(x, head)), rtol=1e-5)
    for a, b in zip(jax.grad(fused, argnums=(0, 1))(x, head),
                    jax.grad(ref_obj, argnums=(0, 1))(x, head)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # The teacher gets no gradient.
    g_teacher = jax.grad(lambda t: distill_sums(spec, x, head, t, thead, targets, mask,
                                                vocab_size=vocab)["kd_sum"])(tx)
    assert not np.any(np.asarray(g_teacher))
