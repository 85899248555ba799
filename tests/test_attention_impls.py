"""The selectable attention implementations compute the reference function (`xla_attention`).

chunked runs everywhere; splash runs on CPU in the Pallas interpreter; cudnn needs an NVIDIA GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.models import Transformer
from jaxlm.models.attention import resolve_attention, xla_attention
from jaxlm.models.chunked_attention import block_size, chunked_attention
from jaxlm.models.kernel_attention import cudnn_attention, splash_attention
from jaxlm.parallel import sharding
from jaxlm.stages import pretrain
from jaxlm.tools.aot import all_eqns
from tests.model_fixtures import LLAMA_TINY, attention_inputs, init_params, packed_batch


def _value_and_grads(attend, args, seg, ct):
    def f(q, kk, v):
        return jnp.sum(attend(q, kk, v, seg) * ct)
    return attend(*args, seg), jax.grad(f, argnums=(0, 1, 2))(*args)


def _jit_value_and_grads(attend, args, seg, ct):
    return jax.jit(lambda *a: _value_and_grads(attend, a, seg, ct))(*args)


def _assert_close(got, ref, tol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("length,heads,kv_heads,block", [(32, 4, 2, 8), (24, 4, 4, 16),
                                                         (40, 4, 1, 8)])
def test_chunked_matches_xla_values_and_grads(length, heads, kv_heads, block):
    """GQA/MHA/MQA, packed documents with padding, several query and key tiles (and a block
    target that does not divide L: 24 -> 12)."""
    args, seg, ct = attention_inputs(2, length, heads, kv_heads, 8, seed=length)
    ref = _jit_value_and_grads(xla_attention, args, seg, ct)
    got = _jit_value_and_grads(functools.partial(chunked_attention, block=block), args, seg, ct)
    _assert_close(got, ref, 1e-5)


def test_chunked_never_materialises_the_score_matrix():
    """At L = 1024 with 128-row tiles, no value of the forward or backward pass has two
    sequence-sized dimensions (the [L, L] scores of xla_attention do)."""
    length = 1024
    args, seg, ct = attention_inputs(1, length, 2, 1, 8)

    def shapes(fn):
        jaxpr = jax.make_jaxpr(lambda *a: _value_and_grads(fn, a, seg, ct))(*args)
        return [tuple(v.aval.shape) for eqn in all_eqns(jaxpr.jaxpr) for v in eqn.outvars
                if hasattr(v.aval, "shape")]

    def square(shape):
        return sum(d == length for d in shape) >= 2

    assert any(square(s) for s in shapes(xla_attention))
    assert not any(square(s) for s in shapes(functools.partial(chunked_attention, block=128)))


def test_block_size_divides_length():
    assert block_size(2048) == 512
    assert block_size(24, 16) == 12
    assert block_size(7, 512) == 7


@pytest.mark.slow
def test_model_with_chunked_attention_matches_xla_loss_and_grads():
    cfg = dataclasses.replace(LLAMA_TINY, attention="chunked")
    model, ref_model = Transformer(cfg), Transformer(dataclasses.replace(cfg, attention="xla"))
    params = init_params(model.cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, 250, seed=3).items()}

    def run(m):
        return jax.jit(jax.value_and_grad(functools.partial(pretrain.loss_fn, model=m),
                                          has_aux=True))(params, batch)

    _assert_close(run(model), run(ref_model), 1e-5)


def test_splash_matches_xla_in_interpret_mode():
    """The Pallas TPU kernel, run by the Pallas interpreter on CPU: values and gradients, GQA,
    packed segments; under an 8-device mesh (shard_map over batch and heads) too."""
    args, seg, ct = attention_inputs(2, 128, 4, 2, 128, seed=1)
    splash = functools.partial(splash_attention, interpret=True)
    ref = _jit_value_and_grads(xla_attention, args, seg, ct)
    _assert_close(_jit_value_and_grads(splash, args, seg, ct), ref, 2e-5)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "pipeline": 2})
    with sharding.activate(mesh):
        spec = NamedSharding(mesh, P("data", None, "tensor", None))
        sharded = jax.device_put(args, spec)
        out = jax.jit(lambda q, kk, v: splash(q, kk, v, seg))(*sharded)
    _assert_close(out, ref[0], 2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU (JAX_PLATFORMS=cpu here)")
def test_cudnn_matches_xla_on_gpu():
    args, seg, ct = attention_inputs(2, 256, 8, 2, 64, seed=2)
    args = jax.tree.map(lambda x: x.astype(jnp.bfloat16), args)
    ref = _jit_value_and_grads(xla_attention, args, seg, ct.astype(jnp.bfloat16))
    got = _jit_value_and_grads(cudnn_attention, args, seg, ct.astype(jnp.bfloat16))
    _assert_close(jax.tree.map(lambda x: x.astype(jnp.float32), got),
                  jax.tree.map(lambda x: x.astype(jnp.float32), ref), 5e-2)


def test_auto_picks_the_platform_kernel():
    assert resolve_attention("auto", "cpu") == "blocked"
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("auto", "cuda") == "cudnn"
    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("chunked", "tpu") == "chunked"
    # Splash has blocks of 128 positions: other lengths get XLA's attention on TPU.
    assert resolve_attention("auto", "tpu", length=256) == "splash"
    assert resolve_attention("auto", "tpu", length=64) == "xla"
    assert resolve_attention("auto", "cpu", length=64) == "blocked"
