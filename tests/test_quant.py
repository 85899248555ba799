"""Weight quantization (jaxlm/quant): the quantizer against a direct numpy computation, PTQ
logits against the float model's, int8 x int8 matmuls for dynamic-range quantization, QAT's
forward equal to PTQ's with straight-through gradients, and the `quant` config checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from jaxlm.models import ModelConfig, Transformer
from jaxlm.models.quant import quantizer
from jaxlm.models.quant.spec import QuantSpec, from_preset
from jaxlm.run import config as config_lib
from jaxlm.run.errors import ConfigError
from jaxlm.stages.pretrain import loss_fn
from tests.model_fixtures import packed_batch

# d 64, head_dim 16, d_ff 128: tiles of 16 divide every quantized input axis.
CFG = ModelConfig(vocab_size=250, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, d_ff=128, max_seq_len=16, init_std=0.05)


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 16), jnp.int32))[
        "params"]))(jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, CFG.vocab_size).items()}
    return params, batch


def _logits(spec: QuantSpec, params, batch):
    model = Transformer(dataclasses.replace(CFG, quant=spec))
    return jax.jit(model.apply)({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])[..., :CFG.vocab_size]


def _numpy_quantize(w: np.ndarray, qmax: int, tile: int, scale=None):
    """Symmetric absmax quantization of w [L, H, K, D] (wo stacked over layers): one scale per
    (layer, output) over H and K, or with `tile` per (layer, head, tile of K, output).
    Returns (values, scale [broadcast to w]); `scale`: round with this one instead."""
    w = w.astype(np.float32)
    lay, h, k, d = w.shape
    if tile:
        absmax = np.abs(w.reshape(lay, h, k // tile, tile, d)).max(axis=3)
        absmax = np.repeat(absmax, tile, axis=2)
    else:
        absmax = np.broadcast_to(np.abs(w).max(axis=(1, 2), keepdims=True), w.shape)
    want = (absmax / np.float32(qmax + 0.5)).astype(np.float32)  # qwix: the top bucket is whole
    scale = want if scale is None else scale
    return np.clip(np.round(w / scale), -qmax - 1, qmax), want


@pytest.mark.parametrize("weight,tile", [("int8", 0), ("int4", 0), ("int4", 4)])
def test_quantize_weight_matches_numpy_scale_and_rounding(weight, tile):
    qmax = 127 if weight == "int8" else 7
    w = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 16, 32)))  # [L, H, K, D]
    q = quantizer.quantize_weight(jnp.asarray(w), QuantSpec("ptq", weight, tile_size=tile), "wo")
    assert q.scale.shape == ((2, 4, 16 // tile, 32) if tile else (2, 1, 1, 32))
    scale = np.asarray(qwix.dequantize(dataclasses.replace(q, qvalue=jnp.ones_like(q.qvalue))))
    _, want_scale = _numpy_quantize(w, qmax, tile)
    # absmax / 7.5 (or 127.5), to the last bit XLA's division by a constant may differ in
    np.testing.assert_allclose(scale, want_scale, rtol=2e-7)
    want_q, _ = _numpy_quantize(w, qmax, tile, scale=scale)
    got_q = np.asarray(q.qvalue.astype(jnp.int8))
    # Each channel's (tile's) absmax lands on +-(qmax + 0.5), the rounding boundary itself:
    # there XLA's w * (1 / scale) may fall a bit either side, so both neighbours are right.
    edge = np.abs(np.abs(w / scale) - (qmax + 0.5)) < 1e-4
    np.testing.assert_array_equal(got_q[~edge], want_q[~edge])
    assert np.all(np.abs(got_q[edge] - np.trunc(w / scale)[edge]) <= 1)
    assert edge.sum() <= 2 * scale.size // (tile if tile else 64)  # ~one per scale group
    assert got_q.min() == -qmax - 1 or got_q.max() == qmax  # the range is used to its end
    np.testing.assert_array_equal(np.asarray(qwix.dequantize(q)),
                                  (got_q * scale).astype(np.float32))


@pytest.mark.slow
def test_stacked_layers_keep_their_own_scales():
    w = jax.random.normal(jax.random.key(2), (3, 64, 32)) * jnp.asarray([1.0, 10.0, 0.1])[
        :, None, None]
    spec = QuantSpec("ptq", "int4", tile_size=16)
    stacked = quantizer.quantize_weight(w, spec, "w_in")
    for i in range(3):
        one = quantizer.quantize_weight(w[i], spec, "w_in")
        np.testing.assert_array_equal(np.asarray(stacked.scale[i]), np.asarray(one.scale))
        np.testing.assert_array_equal(np.asarray(stacked.qvalue[i]), np.asarray(one.qvalue))


def _rel_error(out, ref):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref - ref.mean())


@pytest.mark.slow
def test_ptq_logits_stay_close_to_the_float_model(setup):
    params, batch = setup
    ref = _logits(QuantSpec(), params, batch)
    err = {}
    for name, preset, tile in [("int8", "int8", 0), ("int8_dynamic", "int8_dynamic", 0),
                               ("int4", "int4", 0), ("int4_t16", "int4", 16),
                               ("nf4_t16", "nf4", 16)]:
        spec = from_preset(preset, tile)
        err[name] = _rel_error(_logits(spec, quantizer.quantize_params(params, spec), batch), ref)
    # Stated tolerances (docs/quantization.md): relative L2 error of the logits.
    assert err["int8"] < 0.02, err
    assert err["int8_dynamic"] < 0.03, err
    assert err["int4"] < 0.25 and err["nf4_t16"] < 0.25, err
    assert err["int4"] > 3 * err["int8"], err  # fewer bits cost accuracy
    assert err["int4_t16"] < err["int4"], err  # sub-channel scales beat per-channel at int4


@pytest.mark.slow
def test_every_matmul_weight_and_nothing_else_is_quantized(setup):
    params, _ = setup
    q = quantizer.quantize_params(params, from_preset("int8"))
    flat = jax.tree_util.tree_flatten_with_path(q, is_leaf=quantizer.is_qarray)[0]
    names = {"/".join(str(k.key) for k in path): quantizer.is_qarray(leaf) for path, leaf in flat}
    assert {n for n, is_q in names.items() if is_q} == {
        "head", *(f"blocks/attn/{w}" for w in ("wq", "wk", "wv", "wo")),
        *(f"blocks/mlp/{w}" for w in ("w_in", "w_gate", "w_out"))}
    # the model built with the spec declares exactly this tree (what a checkpoint restores)
    model = Transformer(dataclasses.replace(CFG, quant=from_preset("int8")))
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                            jnp.zeros((1, 16), jnp.int32))["params"])
    assert jax.tree.structure(abstract) == jax.tree.structure(q)
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, abstract, q)
    assert all(jax.tree.leaves(same))


def test_int8_dynamic_runs_int8_by_int8_matmuls(setup):
    params, batch = setup
    spec = from_preset("int8_dynamic")
    model = Transformer(dataclasses.replace(CFG, quant=spec))
    hlo = jax.jit(model.apply).lower({"params": quantizer.quantize_params(params, spec)},
                                     batch["inputs"]).as_text()
    int8_dots = [line for line in hlo.splitlines() if "dot_general" in line
                 and line.count("xi8>") >= 2 and "-> tensor<" in line]
    assert len(int8_dots) >= 8, int8_dots  # 7 projections (scanned once) + the head
    # weight-only int8 dequantizes into float matmuls instead
    w8 = from_preset("int8")
    hlo = jax.jit(Transformer(dataclasses.replace(CFG, quant=w8)).apply).lower(
        {"params": quantizer.quantize_params(params, w8)}, batch["inputs"]).as_text()
    assert not [line for line in hlo.splitlines() if "dot_general" in line and "xi8>" in line]


@pytest.mark.slow
@pytest.mark.parametrize("weight,tile", [("int8", 0), ("int4", 16)])
def test_qat_forward_equals_the_ptq_forward_of_the_same_weights(setup, weight, tile):
    params, batch = setup
    qat, ptq = QuantSpec("qat", weight, tile_size=tile), QuantSpec("ptq", weight, tile_size=tile)
    np.testing.assert_allclose(
        _logits(qat, params, batch),
        _logits(ptq, quantizer.quantize_params(params, ptq), batch), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_qat_gradients_pass_straight_through_the_quantizer(setup):
    """STE: the gradient w.r.t. each weight is the float model's gradient at the
    fake-quantized weights."""
    params, batch = setup
    spec = QuantSpec("qat", "int4", tile_size=16)
    qat_model = Transformer(dataclasses.replace(CFG, quant=spec))
    grad = lambda m, p: jax.jit(jax.grad(lambda p: loss_fn(p, batch, model=m)[0]))(p)
    g_qat = grad(qat_model, params)
    fake = quantizer.dequantize_params(quantizer.quantize_params(params, spec))
    g_ref = grad(Transformer(CFG), fake)
    for path, g in jax.tree_util.tree_flatten_with_path(g_qat)[0]:
        assert float(jnp.abs(g).max()) > 0, path
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 g_qat, g_ref)
    # and it is not the float model's gradient at the float weights
    g_float = grad(Transformer(CFG), params)
    diff = float(jnp.abs(g_qat["blocks"]["mlp"]["w_in"] - g_float["blocks"]["mlp"]["w_in"]).max())
    assert diff > 1e-6


@pytest.mark.parametrize("key,value,message", [
    ("mode", "int8", "quant.mode"),
    ("weight", "int3", "quant.weight"),
    ("activation", "int8", "quant.activation"),  # with int4 weights / not ptq
    ("tile_size", 24, "quant.tile_size"),  # does not divide d_model 64
])
def test_config_errors_name_the_quant_key(key, value, message):
    c = config_lib.base_config()
    c.model.update(d_model=64, num_heads=4, d_ff=128, vocab_size=250)
    c.quant.mode, c.quant.weight = "qat", "int4"
    c.quant[key] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


def test_training_ptq_weights_needs_lora():
    c = config_lib.base_config()
    c.model.vocab_size = 250
    c.quant.mode = "ptq"
    with pytest.raises(ConfigError, match="quant.mode"):
        config_lib.validate(c)
    c.model.lora.rank = 4  # QLoRA: the quantized base is frozen
    config_lib.validate(c)
