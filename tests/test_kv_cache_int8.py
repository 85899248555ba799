"""The int8 KV cache (model.kv_cache_dtype="int8"): quantization against numpy, the folded
scales against attention over the dequantized cache, cache bytes, and decoding (plain, ring
buffer, speculative, beam search, tensor-parallel) against the float cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.inference import Request, Sampler, decode, shard_params
from jaxlm.models import ModelConfig, kv_cache
from jaxlm.models.kv_cache import with_kv_cache
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.errors import ConfigError
from tests.model_fixtures import init_params

# head_dim 32: the int8 cache's float32 scale costs 4 bytes per 32 int8 values.
CFG = ModelConfig(vocab_size=250, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32, d_ff=128, max_seq_len=128)
INT8 = dataclasses.replace(CFG, kv_cache_dtype="int8")
# Tolerance of int8-cache logits: max |difference| over the real vocab, as a fraction of the
# float-cache logits' standard deviation (measured: 2-4% on these models).
LOGIT_TOL = 0.08


def _params(cfg, seed=1, gain=2.0):
    """Random params times `gain` (logits with a std of ~0.6 rather than the init's ~0.15)."""
    return jax.tree.map(lambda x: x * gain, init_params(cfg, seed))


def _leaves(cache, name):
    return [x for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]
            if kv_cache._leaf_name(path) == name]


def _numpy_quantize(x):
    """Symmetric absmax int8 over the last axis: scale = absmax / 127.5 (1 for an all-zero
    vector), values = round-half-even(x / scale) clipped to [-128, 127]."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(-1) / np.float32(127.5)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), 1.0, scale).astype(np.float32)
    values = np.clip(np.round(x / scale[..., None]), -128, 127).astype(np.int8)
    return values, scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_and_dequantize_match_numpy(dtype):
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 32)).astype(np.float32) * 3
    x[0, 1, 2] = 0.0  # an all-zero head (an empty slot)
    x = jnp.asarray(x, dtype)
    values, scale = jax.jit(kv_cache.quantize)(x)
    want_values, want_scale = _numpy_quantize(x.astype(jnp.float32))
    assert values.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (2, 5, 3)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    # Elements within float rounding of a half step (each head's absmax element sits at
    # +-127.5 steps) may round either way; every other element is exactly numpy's.
    x32 = np.asarray(x.astype(jnp.float32))
    steps = x32 / want_scale[..., None]
    boundary = np.abs(np.abs(steps - np.trunc(steps)) - 0.5) < 1e-4
    values = np.asarray(values, int)
    assert boundary.mean() < 0.05
    np.testing.assert_array_equal(values[~boundary], want_values[~boundary])
    assert np.abs(values - want_values).max() <= 1
    back = np.asarray(kv_cache.dequantize(values, scale))
    np.testing.assert_allclose(back, np.asarray(values, np.float32) * want_scale[..., None],
                               rtol=1e-6)
    # Every element within half a step of the original: 0.5 / 127.5 of its head's absmax.
    err = np.abs(back - x32)
    assert np.all(err <= 0.5 * want_scale[..., None] * (1 + 1e-4))
    assert np.all(back[0, 1, 2] == 0.0)


@pytest.mark.slow
def test_folded_scales_equal_attention_over_the_dequantized_cache():
    """The scales folded into scores and probabilities give what attention over the float
    values * scale gives (the fold is exact up to float rounding), with the causal mask,
    padding and a visibility mask."""
    rng = np.random.default_rng(1)
    b, length, m, h, n, k = 2, 3, 11, 4, 2, 32
    q = jnp.asarray(rng.normal(size=(b, length, h, k)), jnp.float32)
    keys, values = (jnp.asarray(rng.normal(size=(b, m, n, k)) * 2, jnp.float32)
                    for _ in range(2))
    valid = jnp.asarray(rng.random((b, m)) > 0.2).at[:, m - length:].set(True)
    k8, k_scale = kv_cache.quantize(keys)
    v8, v_scale = kv_cache.quantize(values)
    start = jnp.int32(m - length)
    for visible in (None, jnp.asarray(rng.random((b, length, m)) > 0.3).at[:, :, -1].set(True)):
        got = kv_cache.attend(q, k8, v8, valid, start, visible, k_scale_BxMxN=k_scale,
                              v_scale_BxMxN=v_scale)
        want = kv_cache.attend(q, kv_cache.dequantize(k8, k_scale),
                               kv_cache.dequantize(v8, v_scale), valid, start, visible)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
        # ... and the quantization error itself is small but not nothing.
        exact = kv_cache.attend(q, keys, values, valid, start, visible)
        assert 1e-4 < float(jnp.abs(got - exact).max()) < 0.1


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_cache_bytes_halve_bf16_and_quarter_fp32(compute, scan):
    """kv_bytes of int8 vs the compute dtype: (K + 4) / (itemsize * K) with the float32 scale
    per head of K values; the entries have the same slots and axes otherwise."""
    cfg = dataclasses.replace(CFG, compute_dtype=compute, scan_layers=scan)
    shapes = {}
    for kv in ("", "int8"):
        lm = decode.TransformerLM(dataclasses.replace(cfg, kv_cache_dtype=kv))
        shapes[kv] = jax.eval_shape(lambda lm=lm: lm.init_cache(3, 40))
    itemsize, k = jnp.dtype(compute).itemsize, cfg.head_dim
    float_bytes, int8_bytes = kv_cache.kv_bytes(shapes[""]), kv_cache.kv_bytes(shapes["int8"])
    assert float_bytes == 2 * cfg.num_layers * 3 * 40 * cfg.num_kv_heads * k * itemsize
    assert int8_bytes * itemsize * k == float_bytes * (k + 4)
    assert int8_bytes / float_bytes <= {"bfloat16": 0.57, "float32": 0.29}[compute]
    int8_k, float_k = _leaves(shapes["int8"], "k"), _leaves(shapes[""], "k")
    assert len(int8_k) == (1 if scan else cfg.num_layers)
    assert [x.dtype for x in int8_k] == [jnp.int8] * len(int8_k)
    assert [x.shape for x in int8_k] == [x.shape for x in float_k]
    assert [s.shape for s in _leaves(shapes["int8"], "k_scale")] == [x.shape[:-1]
                                                                   for x in int8_k]


def _forced_logits(cfg, params, tokens, valid, forced):
    """Logits [B, 1 + N, V] after the prompt and after each of the N forced tokens."""
    lm = decode.TransformerLM(cfg)
    last, cache, pos = jax.jit(functools.partial(
        decode.prefill, lm, cache_len=tokens.shape[1] + forced.shape[1]))(params, tokens, valid)
    step = jax.jit(functools.partial(lm.step, params))
    out = [last]
    for i in range(forced.shape[1]):
        logits, cache = step(cache, forced[:, i:i + 1], pos[:, None],
                             np.ones((len(tokens), 1), bool))
        last, pos = logits[:, 0], pos + 1
        out.append(last)
    return np.stack(out, 1)[..., :cfg.vocab_size], cache


def _prompts(rng, batch=4, length=12):
    tokens = rng.integers(3, 250, (batch, length)).astype(np.int32)
    valid = np.ones((batch, length), bool)
    valid[1, :5] = valid[2, :9] = False  # left padding
    return tokens, valid


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(
    CFG, position_embedding="learned", norm="layernorm", mlp_activation="gelu", use_bias=True,
    num_kv_heads=4, scan_layers=False)], ids=["llama_scan", "gpt2_unscanned"])
def test_int8_logits_within_tolerance_over_prefill_and_decode(cfg):
    """Prefill of 4 left-padded prompts, then 24 decode steps fed the same tokens: every
    step's int8-cache logits within LOGIT_TOL (relative to the logits' std) of the float
    cache's, and the same top-1 token at >= 95% of the steps."""
    rng = np.random.default_rng(0)
    tokens, valid = _prompts(rng)
    forced = rng.integers(3, 250, (4, 24)).astype(np.int32)
    params = _params(cfg)
    want, _ = _forced_logits(cfg, params, tokens, valid, forced)
    got, cache = _forced_logits(dataclasses.replace(cfg, kv_cache_dtype="int8"), params,
                                tokens, valid, forced)
    assert all(x.dtype == jnp.int8 for x in _leaves(cache, "k") + _leaves(cache, "v"))
    rel = np.abs(got - want).max() / want.std()
    assert 1e-4 < rel < LOGIT_TOL, rel
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95


def _agreement(a, b):
    """Fraction of generated positions where two decodes hold the same token."""
    return np.mean([x == y for xs, ys in zip(a, b) for x, y in zip(xs, ys)])


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3], [40, 41, 42, 43, 44], [100, 7, 7, 2]]
NEW = 24


@pytest.fixture(scope="module")
def greedy():
    """(params, float-cache greedy decode, int8-cache greedy decode) of PROMPTS."""
    params = _params(CFG)
    requests = [Request(p, NEW) for p in PROMPTS]
    plain = [c.tokens for c in Sampler(CFG, params).generate(requests)]
    int8 = [c.tokens for c in Sampler(INT8, params).generate(requests)]
    return params, plain, int8


@pytest.mark.slow
def test_greedy_decode_agrees_with_the_float_cache(greedy):
    """Measure: along the float cache's greedy decode, the share of its tokens that the int8
    cache, given the same preceding tokens, picks too (teacher-forced top-1 agreement, so one
    flip on a near-tie does not count against every later token). At least 95%, and all of
    those the float model does not nearly tie."""
    params, plain, _ = greedy
    width = max(map(len, PROMPTS))
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    valid = np.zeros((len(PROMPTS), width), bool)
    for i, p in enumerate(PROMPTS):
        tokens[i, width - len(p):], valid[i, width - len(p):] = p, True
    decoded = np.asarray(plain, np.int32)
    logits = {cfg.kv_cache_dtype: _forced_logits(cfg, params, tokens, valid, decoded)[0][
        :, :NEW] for cfg in (CFG, INT8)}
    np.testing.assert_array_equal(logits[""].argmax(-1), decoded)  # float reproduces itself
    same = logits["int8"].argmax(-1) == decoded
    assert np.mean(same) >= 0.95  # measured: 115 of 120
    # The flips are near-ties: wherever the float top-1 leads by more than 0.01 (1.5% of the
    # logits' std; int8 moves single logits by up to ~0.025), int8 picks it too.
    top2 = np.sort(logits[""], axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.01
    assert np.mean(clear) > 0.85 and np.all(same[clear])


@pytest.mark.slow
def test_speculative_decoding_with_int8_caches_is_the_int8_greedy_decode(greedy):
    """Rejected drafts are invalidated in both int8 caches (their k_scale/v_scale slots stay
    as written, masked): the output is exactly the int8 target's plain greedy decode, which
    agrees with the float cache's as the test above measures."""
    params, _, int8 = greedy
    draft_cfg = dataclasses.replace(INT8, num_layers=1, d_ff=32)
    sampler = Sampler(INT8, params)
    out = sampler.speculative([Request(p, NEW) for p in PROMPTS], draft_cfg,
                              _params(draft_cfg, seed=7), num_draft=3)
    assert [c.tokens for c in out] == int8
    assert 0.0 <= sampler.last_acceptance_rate < 1.0  # some drafts really were rejected


@pytest.mark.slow
def test_beam_search_reorders_the_scales_with_the_values(greedy):
    """`reorder` gathers k_scale/v_scale rows with k/v (scanned: behind the layers axis); one
    beam is the int8 greedy decode; 3 beams agree with the float cache's 3 beams."""
    params, _, int8 = greedy
    cache = decode.TransformerLM(INT8).init_cache(3, 8)
    cache = jax.tree.map(lambda x: jnp.asarray(
        np.random.default_rng(2).integers(-100, 100, x.shape), x.dtype), cache)
    rows = jnp.asarray([2, 0, 0])
    moved = kv_cache.reorder(cache, rows)
    for name in ("k", "v", "k_scale", "v_scale", "valid"):
        (x,), (y,) = _leaves(cache, name), _leaves(moved, name)
        np.testing.assert_array_equal(y, np.asarray(x)[:, rows])  # [layers, batch, ...]
    one = Sampler(INT8, params).beam_search([Request(p, NEW) for p in PROMPTS], 1)
    assert [beams[0].tokens for beams in one] == int8
    requests = [Request(p, 12) for p in PROMPTS]
    three = [b[0].tokens for b in Sampler(INT8, params).beam_search(requests, 3)]
    three_float = [b[0].tokens for b in Sampler(CFG, params).beam_search(requests, 3)]
    assert _agreement(three, three_float) >= 0.9


WINDOW = 6


@pytest.mark.slow
def test_ring_buffer_int8_within_tolerance_of_the_float_ring():
    """A sliding window in every layer: the int8 ring of WINDOW slots (a 12-token prompt
    wraps it) gives logits within LOGIT_TOL of the float ring over prefill + 24 steps."""
    cfg = dataclasses.replace(CFG, sliding_window=WINDOW)
    rng = np.random.default_rng(3)
    tokens, valid = _prompts(rng)
    forced = rng.integers(3, 250, (4, 24)).astype(np.int32)
    params = _params(cfg)
    want, float_cache = _forced_logits(cfg, params, tokens, valid, forced)
    got, cache = _forced_logits(dataclasses.replace(cfg, kv_cache_dtype="int8"), params,
                                tokens, valid, forced)
    assert kv_cache.is_ring(cache) and kv_cache.cache_length(cache) == WINDOW
    assert [x.shape for x in _leaves(cache, "k_scale")] == [(2, 4, WINDOW, 2)]
    rel = np.abs(got - want).max() / want.std()
    assert 1e-4 < rel < LOGIT_TOL, rel
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    # The ring holds the last WINDOW keys: dequantized, they are the float ring's, to int8
    # precision (layer 0 sees no earlier quantization error).
    (k8,), (ks,), (kf,) = (_leaves(c, n) for c, n in ((cache, "k"), (cache, "k_scale"),
                                                    (float_cache, "k")))
    np.testing.assert_allclose(kv_cache.dequantize(k8[0], ks[0]), kf[0],
                               atol=0.5 * float(ks[0].max()) * (1 + 1e-5))


@pytest.mark.slow
def test_tensor_parallel_int8_cache_is_sharded_like_the_float_cache(greedy):
    """Over a (data 2, tensor 2) mesh the int8 values and their scales split kv heads over
    `tensor` and rows over `data`, and greedy decoding equals the unsharded int8 decode."""
    params, _, int8 = greedy
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "pipeline": 2})
    sharded = shard_params(INT8, params, mesh)
    sampler = Sampler(INT8, sharded, mesh=mesh)
    requests = [Request(p, NEW) for p in PROMPTS] + [Request(PROMPTS[0], NEW)]
    assert [c.tokens for c in sampler.generate(requests)] == int8 + int8[:1]
    lm = decode.TransformerLM(INT8)
    tokens = jnp.ones((4, 8), jnp.int32)
    with sharding.activate(mesh):
        _, cache, _ = jax.jit(functools.partial(decode.prefill, lm, cache_len=16))(
            sharded, tokens, tokens > 0)
    (k8,), (ks,) = _leaves(cache, "k"), _leaves(cache, "k_scale")
    assert tuple(k8.sharding.spec)[1:4] == ("data", None, "tensor")  # [layers, B, M, N, K]
    assert tuple(ks.sharding.spec)[1:4] == ("data", None, "tensor")  # [layers, B, M, N]


def test_kv_cache_dtype_is_validated_and_reaches_the_flags():
    c = config_lib.base_config()
    c.model.vocab_size = 300
    assert config_lib.model_config(c).kv_cache_dtype == ""
    c.model.kv_cache_dtype = "int8"
    assert config_lib.model_config(c).kv_cache_dtype == "int8"
    c.model.kv_cache_dtype = "int4"
    with pytest.raises(ConfigError, match="config key model.kv_cache_dtype"):
        config_lib.model_config(c)
    assert with_kv_cache(CFG, "int8").kv_cache_dtype == "int8"
    assert with_kv_cache(INT8, "compute").kv_cache_dtype == ""
    assert with_kv_cache(INT8, "") is INT8  # no flag: the run's setting
    with pytest.raises(ValueError, match="--kv_cache='fp8'"):
        with_kv_cache(CFG, "fp8")
    from jaxlm.tools import generate

    with pytest.raises(ValueError, match="--kv_cache='fp8'"):  # refused before loading
        generate.run(generate.Options(workdir="/nonexistent", prompts=("x",), kv_cache="fp8"))


@pytest.mark.slow
def test_generate_kv_cache_flag_decodes_with_the_int8_cache(tmp_path):
    """`jaxlm.tools.generate --kv_cache=int8` on a checkpoint: the tokens are the int8 Sampler's,
    and
    the sampler it built holds the int8 setting (the run's config says nothing about it)."""
    import io
    import json

    from jaxlm.run import trainer
    from jaxlm.tools import generate
    from jaxlm.weights.restore import restore
    from tests.run_fixtures import tiny_run_config

    trainer.run(tiny_run_config(tmp_path, num_layers=1, seq_len=16), str(tmp_path / "run"))
    loaded = restore(str(tmp_path / "run"))
    assert loaded.model_cfg.kv_cache_dtype == ""
    prompt = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("def ")
    eos = loaded.tokenizer.eos_id
    sampler = Sampler(with_kv_cache(loaded.model_cfg, "int8"), loaded.params)
    want = sampler.generate([Request(prompt, 8, (eos,))])[0].tokens
    out = io.StringIO()
    opts = generate.Options(workdir=str(tmp_path / "run"), prompts=("def ",), max_new_tokens=8,
                            kv_cache="int8", json=True)
    generate.run(opts, stdout=out)
    assert json.loads(out.getvalue().splitlines()[-1])["token_ids"] == want
    session = generate._Session(opts)
    assert session.sampler.cfg.kv_cache_dtype == "int8"
