"""The hand-written fast paths equal the straightforward reference (values and gradients).

Each kernel with a custom VJP (dense, MLP core, norms, attention, fused head + cross-entropy)
is compared with plain-JAX autodiff of the reference formula, then the whole model and train
step are compared: fused loss vs logits + `cross_entropy_sum`, sharded vs single device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.losses.cross_entropy import cross_entropy_sum, fused_cross_entropy_sum
from jaxlm.models import Transformer
from jaxlm.models.attention import fused_attention, xla_attention
from jaxlm.models.mlp import dense, mlp_core, weight_grad
from jaxlm.models.norms import normalize
from jaxlm.parallel import sharding
from jaxlm.stages import pretrain
from tests.model_fixtures import GPT2_TINY, LLAMA_TINY, init_params, one_pretrain_step, packed_batch


def _normal(seed, *shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


def _assert_close(a, b, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                         np.asarray(y, np.float32),
                                                         rtol=rtol, atol=atol), a, b)


def _value_and_grads(fn, args, cotangent_seed=99):
    """fn(*args) and the gradient of <fn(*args), random cotangent> w.r.t. every arg."""
    out = fn(*args)
    ct = _normal(cotangent_seed, *out.shape, dtype=out.dtype)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct),
                     argnums=tuple(range(len(args))))(*args)
    return out, grads


@pytest.mark.parametrize("i,o", [(16, 48), (48, 16), (32, 32)])
def test_dense_matches_einsum(i, o):
    x, w = _normal(0, 2, 5, i), _normal(1, i, o)
    ref = _value_and_grads(lambda x, w: jnp.einsum("bli,io->blo", x, w), (x, w))
    _assert_close(jax.jit(lambda x, w: _value_and_grads(dense, (x, w)))(x, w), ref)
    _assert_close(weight_grad(x, _normal(2, 2, 5, o)),
                  jnp.einsum("bli,blo->io", x, _normal(2, 2, 5, o)))


@pytest.mark.slow
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False)])
def test_mlp_core_matches_autodiff(activation, bias):
    x, w_in, w_out = _normal(0, 2, 6, 16), _normal(1, 16, 40, scale=0.3), _normal(2, 40, 16)
    b_in = _normal(3, 40) if bias else None
    w_gate = _normal(4, 16, 40, scale=0.3) if activation == "swiglu" else None

    def reference(x, w_in, b_in, w_gate, w_out):
        h = x @ w_in + (0.0 if b_in is None else b_in)
        h = jax.nn.silu(x @ w_gate) * h if activation == "swiglu" else jax.nn.gelu(h)
        return h @ w_out

    args = (x, w_in, b_in, w_gate, w_out)
    out, ct = reference(*args), _normal(9, 2, 6, 16)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * ct), argnums=(0, 1, 2, 3, 4))(*args)
    fast = functools.partial(mlp_core, activation)
    got_grads = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a) * ct), argnums=(0, 1, 2, 3, 4)))(
        *args)
    _assert_close(fast(*args), out)
    # Gradients of size up to ~15 summed over 12 positions: float32 rounding of the sums.
    _assert_close(got_grads, ref_grads, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("centered", [True, False])
def test_norm_matches_autodiff(centered):
    x, scale = _normal(0, 3, 5, 24, scale=2.0) + 0.5, _normal(1, 24) + 1.0
    bias = _normal(2, 24) if centered else None

    def reference(x, scale, bias):
        y = x - jnp.mean(x, -1, keepdims=True) if centered else x
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + 1e-5) * scale
        return y if bias is None else y + bias

    args = (x, scale, bias)
    fast = lambda x, s, b: normalize(x, s, b, centered, 1e-5, jnp.float32)
    ct = _normal(9, 3, 5, 24)
    ref = jax.grad(lambda *a: jnp.sum(reference(*a) * ct), argnums=(0, 1, 2))(*args)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a) * ct), argnums=(0, 1, 2)))(*args)
    _assert_close(fast(*args), reference(*args))
    _assert_close(got, ref, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("length,heads,kv_heads", [(16, 4, 4), (16, 4, 2), (128, 4, 1),
                                                   (192, 2, 2), (256, 4, 2)])
def test_fused_attention_matches_xla(length, heads, kv_heads):
    """Covers MHA/GQA/MQA, 1-4 causal query blocks, and packed documents with padding."""
    b, k = 2, 8
    rng = np.random.default_rng(length)
    seg = np.sort(rng.integers(1, 4, size=(b, length)), axis=1).astype(np.int32)
    seg[1, -3:] = 0  # padding tokens form their own "document"
    args = (_normal(0, b, length, heads, k), _normal(1, b, length, kv_heads, k),
            _normal(2, b, length, kv_heads, k))
    ref = _value_and_grads(lambda q, kk, v: xla_attention(q, kk, v, seg), args)
    got = jax.jit(lambda *a: _value_and_grads(lambda q, kk, v: fused_attention(q, kk, v, seg),
                                              a))(*args)
    _assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _reference_loss(hidden, head, targets, mask, z_loss, vocab_size):
    logits = jnp.einsum("bld,vd->blv", hidden, head).astype(jnp.float32)
    logits = jnp.where(jnp.arange(head.shape[0]) < vocab_size, logits, -1e9)
    return cross_entropy_sum(logits, targets, mask, z_loss)


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size,z_loss,chunk_tokens", [(96, 0.0, 8), (90, 1e-2, 24),
                                                            (96, 1e-4, 10_000)])
def test_fused_cross_entropy_matches_logits_path(vocab_size, z_loss, chunk_tokens):
    b, length, d, v = 2, 12, 16, 96
    hidden, head = _normal(0, b, length, d), _normal(1, v, d, scale=0.5)
    targets = jnp.asarray(np.random.default_rng(2).integers(0, vocab_size, (b, length)),
                          jnp.int32)
    mask = jnp.asarray(np.random.default_rng(3).random((b, length)) > 0.2, jnp.float32)
    ref_fn = lambda h, w: _reference_loss(h, w, targets, mask, z_loss, vocab_size)
    fused_fn = lambda h, w: fused_cross_entropy_sum(h, w, targets, mask, z_loss,
                                                    vocab_size=vocab_size,
                                                    chunk_tokens=chunk_tokens)
    (ref_loss, ref_aux), ref_grads = jax.value_and_grad(ref_fn, (0, 1), has_aux=True)(hidden,
                                                                                     head)
    (loss, aux), grads = jax.jit(jax.value_and_grad(fused_fn, (0, 1), has_aux=True))(hidden,
                                                                                   head)
    _assert_close((loss, aux), (ref_loss, ref_aux))
    _assert_close(grads, ref_grads, rtol=1e-4)
    _assert_close(jax.jit(fused_fn)(hidden, head), (ref_loss, ref_aux))  # no-grad path

    # Differentiating an aux sum as well takes the recompute path; it must be exact too.
    def mixed(fn):
        return lambda h, w: (lambda out: out[0] + 0.5 * out[1]["nll_sum"]
                             - 2.0 * out[1]["z_loss_sum"])(fn(h, w))
    _assert_close(jax.jit(jax.grad(mixed(fused_fn), (0, 1)))(hidden, head),
                  jax.grad(mixed(ref_fn), (0, 1))(hidden, head), rtol=1e-4)


def _fused_loss_fn(params, batch, *, model, z_loss=0.0, rng=None):
    """The stage's loss_fn on the fused path (what `jaxlm/stages/pretrain.py` should call)."""
    assert rng is None  # no dropout in these models
    hidden_BxLxD, head_VxD = model.apply({"params": params}, batch["inputs"],
                                         positions_BxL=batch["positions"],
                                         segment_ids_BxL=batch["segment_ids"],
                                         return_hidden=True)
    return fused_cross_entropy_sum(hidden_BxLxD, head_VxD, batch["targets"],
                                   batch["loss_mask"], z_loss,
                                   vocab_size=model.cfg.vocab_size, chunk_tokens=32)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [GPT2_TINY, LLAMA_TINY,
                                 dataclasses.replace(LLAMA_TINY, tie_embeddings=False,
                                                     remat="full"),
                                 dataclasses.replace(GPT2_TINY, scan_layers=False)],
                         ids=["gpt2", "llama", "llama_untied_remat", "gpt2_unrolled"])
def test_model_fast_paths_match_reference_paths(cfg):
    """Fused loss + fused attention vs logits + cross_entropy_sum + plain XLA attention."""
    model, ref_model = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention="xla"))
    params = init_params(model.cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, 250, seed=5).items()}
    ref = jax.jit(jax.value_and_grad(
        functools.partial(pretrain.loss_fn, model=ref_model, z_loss=1e-4), has_aux=True))
    got = jax.jit(jax.value_and_grad(
        functools.partial(_fused_loss_fn, model=model, z_loss=1e-4), has_aux=True))
    _assert_close(got(params, batch), ref(params, batch), rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_fast_paths_stay_close_to_float32():
    cfg = dataclasses.replace(GPT2_TINY, compute_dtype="bfloat16")
    model, ref_model = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention="xla"))
    params = init_params(model.cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, 250, seed=5).items()}
    (loss, _), grads = jax.jit(jax.value_and_grad(
        functools.partial(_fused_loss_fn, model=model), has_aux=True))(params, batch)
    (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(
        functools.partial(pretrain.loss_fn, model=ref_model), has_aux=True))(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.max(jnp.abs(g))) for g in ref_flat)
    for g, r in zip(flat, ref_flat):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, atol=3e-2 * scale)


@pytest.fixture(scope="module")
def fused_single_device():
    batch = packed_batch(8, 16, 250, seed=4)
    single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                                devices=jax.devices()[:1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "loss_fn", _fused_loss_fn)
        params, metrics, _ = one_pretrain_step(single, batch)
        return batch, params, metrics


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (1, 2, 4, 1)])
def test_sharded_step_with_fused_loss_equals_single_device(fused_single_device, shape,
                                                           monkeypatch):
    batch, ref_params, ref_metrics = fused_single_device
    monkeypatch.setattr(pretrain, "loss_fn", _fused_loss_fn)
    params, metrics, _ = one_pretrain_step(
        sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape))), batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"])
    _assert_close(params, ref_params, rtol=1e-5, atol=1e-6)

@pytest.mark.slow
def test_cross_entropy_sum_gradients_match_plain_autodiff():
    """The custom VJP of `cross_entropy_sum` vs autodiff of the plain formula (logits and mask)."""

    def plain(logits, targets, mask, z_loss):
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        nll_sum, z_sum = jnp.sum((log_z - target) * mask), jnp.sum(jnp.square(log_z) * mask)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
        return nll_sum + z_loss * z_sum, {"nll_sum": nll_sum, "z_loss_sum": z_sum,
                                          "num_tokens": jnp.sum(mask), "correct": correct}

    logits = _normal(0, 3, 7, 40, scale=3.0)
    targets = jnp.asarray(np.random.default_rng(1).integers(0, 40, (3, 7)), jnp.int32)
    mask = jnp.asarray(np.random.default_rng(2).random((3, 7)) > 0.3, jnp.float32)

    def objective(fn):  # loss plus every aux sum, so all cotangent paths are exercised
        def f(logits, mask):
            loss, aux = fn(logits, targets, mask, 1e-3)
            return loss + 0.3 * aux["nll_sum"] - 0.7 * aux["z_loss_sum"] + 2.0 * aux["correct"]
        return f

    _assert_close(cross_entropy_sum(logits, targets, mask, 1e-3),
                  plain(logits, targets, mask, 1e-3))
    _assert_close(jax.jit(jax.grad(objective(cross_entropy_sum), (0, 1)))(logits, mask),
                  jax.grad(objective(plain), (0, 1))(logits, mask), rtol=1e-4)
