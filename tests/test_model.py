"""The transformer: causality, document isolation in packed rows, variants, scan equivalence."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import Transformer
from jaxlm.models.rope import apply_rope
from tests.model_fixtures import GPT2_TINY, LLAMA_TINY, packed_batch

VARIANTS = {"llama": LLAMA_TINY, "gpt2": GPT2_TINY,
            "mqa_tied": dataclasses.replace(LLAMA_TINY, num_kv_heads=1, tie_embeddings=True)}


class _Jitted:
    """The model with a jitted apply: eager op-by-op Flax is slow and tests call it often."""

    def __init__(self, cfg):
        self.module = Transformer(cfg)
        self.apply = jax.jit(self.module.apply)


def _init(cfg, seed=0):
    model = _Jitted(cfg)
    init = jax.jit(model.module.init)
    params = nn.meta.unbox(init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_changing_a_token_never_changes_earlier_logits(name):
    model, params = _init(VARIANTS[name])
    tokens = np.random.default_rng(1).integers(1, 250, size=(1, 16)).astype(np.int32)
    base = model.apply({"params": params}, tokens)
    for t in (0, 5, 15):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 7) % 250
        out = model.apply({"params": params}, changed)
        np.testing.assert_allclose(out[0, :t], base[0, :t], atol=1e-6)
        assert not np.allclose(out[0, t:], base[0, t:], atol=1e-6)


@pytest.mark.slow
def test_causality_by_gradient():
    """d logits[t] / d embedding[s] is zero for every s > t."""
    model, params = _init(LLAMA_TINY)
    tokens = jnp.arange(1, 13, dtype=jnp.int32)[None]

    def logits_of(x_BxLxD):
        # Feed embeddings through by replacing the table with one row per position.
        p = dict(params, embed=jnp.zeros_like(params["embed"]).at[1:13].set(x_BxLxD[0]))
        return model.apply({"params": p}, tokens)[0].sum(-1)

    x = params["embed"][1:13][None]
    jac_LxLxD = jax.jit(jax.jacobian(logits_of))(x)[:, 0]
    influence_LxL = np.abs(np.asarray(jac_LxLxD)).sum(-1)
    assert np.all(influence_LxL[np.triu_indices(12, k=1)] == 0)
    assert np.all(influence_LxL[np.tril_indices(12)] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_documents_do_not_see_each_other(name):
    """Logits of a document packed after another equal the logits of it alone (positions reset)."""
    model, params = _init(VARIANTS[name])
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(1, 250, size=6), rng.integers(1, 250, size=10)
    packed = np.concatenate([doc_a, doc_b])[None].astype(np.int32)
    seg = np.array([[1] * 6 + [2] * 10], np.int32)
    pos = np.array([list(range(6)) + list(range(10))], np.int32)
    out = model.apply({"params": params}, packed, positions_BxL=pos, segment_ids_BxL=seg)
    alone_b = model.apply({"params": params}, doc_b[None].astype(np.int32))
    alone_a = model.apply({"params": params}, doc_a[None].astype(np.int32))
    np.testing.assert_allclose(out[0, 6:], alone_b[0], atol=1e-5)
    np.testing.assert_allclose(out[0, :6], alone_a[0], atol=1e-5)


@pytest.mark.slow
def test_scan_and_unrolled_layers_compute_the_same_function():
    scanned, params = _init(LLAMA_TINY)
    unrolled, _ = _init(dataclasses.replace(LLAMA_TINY, scan_layers=False))
    per_layer = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(LLAMA_TINY.num_layers):
        per_layer[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    batch = packed_batch(2, 16, 250)
    kw = dict(positions_BxL=batch["positions"], segment_ids_BxL=batch["segment_ids"])
    np.testing.assert_allclose(unrolled.apply({"params": per_layer}, batch["inputs"], **kw),
                               scanned.apply({"params": params}, batch["inputs"], **kw),
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_memory_not_gradients(remat):
    model, params = _init(LLAMA_TINY)
    remat_model = _Jitted(dataclasses.replace(LLAMA_TINY, remat=remat))
    batch = packed_batch(2, 16, 250)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, batch["inputs"]) ** 2)

    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat_model, p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.slow
def test_padded_vocab_logits_are_masked():
    model, params = _init(LLAMA_TINY)
    assert params["embed"].shape[0] == 256
    logits = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
    assert np.all(np.asarray(logits[..., 250:]) <= -1e8)
    assert np.all(np.isfinite(np.asarray(jax.nn.log_softmax(logits)[..., :250])))


@pytest.mark.slow
def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 10000.0)
        rk = apply_rope(k, jnp.array([[pk]]), 10000.0)
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_logits_and_params():
    model, params = _init(dataclasses.replace(LLAMA_TINY, compute_dtype="bfloat16"))
    assert params["embed"].dtype == jnp.float32
    logits = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
