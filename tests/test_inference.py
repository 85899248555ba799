"""KV-cache decoding against full recompute, sampling filters against numpy, beam search,
best-of-N, speculative decoding, scoring and sharded decoding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.inference import Request, Sampler, SamplingParams, decode, processing, shard_params
from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from tests.greedy_reference import make_greedy_sampler
from tests.model_fixtures import GPT2_TINY, LLAMA_TINY, init_params

LLAMA = dataclasses.replace(LLAMA_TINY, max_seq_len=64)  # scanned layers, RoPE, GQA
GPT2 = dataclasses.replace(GPT2_TINY, max_seq_len=64, scan_layers=False)  # learned positions
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 10


def _params(cfg, seed=1):
    return init_params(cfg, seed)


@pytest.fixture(scope="module")
def llama():
    params = _params(LLAMA)
    sampler = Sampler(LLAMA, params)
    reference = make_greedy_sampler(Transformer(LLAMA), 8 + NEW)
    greedy = [reference(params, p)[:NEW] for p in PROMPTS]
    return params, sampler, greedy


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama_scan", "gpt2_unscanned"])
def test_cached_logits_match_full_forward_at_every_step(cfg):
    """Two left-padded prompts of different lengths, decoded token by token with the cache;
    each step's logits equal the full (causal) forward pass over the unpadded sequence."""
    params, lm = _params(cfg), decode.TransformerLM(cfg)
    prompts, steps = [[4, 8, 15, 16, 23], [42, 7]], 6
    tokens = np.zeros((2, 5), np.int32)
    valid = np.zeros((2, 5), bool)
    for i, p in enumerate(prompts):
        tokens[i, 5 - len(p):], valid[i, 5 - len(p):] = p, True
    step = jax.jit(functools.partial(lm.step, params))
    last, cache, pos = jax.jit(functools.partial(decode.prefill, lm, cache_len=5 + steps))(
        params, tokens, valid)
    seqs, cached = [list(p) for p in prompts], [[], []]
    for _ in range(steps):
        nxt = np.argmax(np.asarray(last), axis=-1).astype(np.int32)
        for i in range(2):
            cached[i].append(np.asarray(last[i]))
            seqs[i].append(int(nxt[i]))
        logits, cache = step(cache, nxt[:, None], np.asarray(pos)[:, None],
                             np.ones((2, 1), bool))
        last, pos = logits[:, 0], pos + 1
    buf = np.zeros((2, 16), np.int32)  # right-padded; causal, so padding never matters
    for i, s in enumerate(seqs):
        buf[i, :len(s)] = s
    full = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, buf))
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(np.stack(cached[i]), full[i, len(p) - 1:len(p) - 1 + steps],
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_cached_greedy_batch_equals_full_recompute_of_each_prompt_alone(llama):
    _, sampler, greedy = llama
    out = sampler.generate([Request(p, NEW) for p in PROMPTS])
    assert [c.tokens for c in out] == greedy
    assert not any(c.stopped for c in out)


@pytest.mark.slow
def test_stop_tokens_and_per_request_budgets(llama):
    _, sampler, greedy = llama
    stop = greedy[0][3]
    first = greedy[0].index(stop)
    requests = [Request(PROMPTS[0], NEW, stop_tokens=(stop, 249)), Request(PROMPTS[1], 4),
                Request(PROMPTS[2], NEW)]
    out = sampler.generate(requests)
    assert out[0].tokens == greedy[0][:first + 1] and out[0].stopped
    assert out[1].tokens == greedy[1][:4] and not out[1].stopped
    assert out[2].tokens == greedy[2]


@pytest.mark.slow
def test_generation_logprob_matches_scoring(llama):
    """The log-probs summed during cached decoding equal those of a full-forward scoring."""
    _, sampler, greedy = llama
    out = sampler.generate([Request(p, NEW) for p in PROMPTS])
    scores = sampler.score([p + g for p, g in zip(PROMPTS, greedy)])
    for p, c, s in zip(PROMPTS, out, scores):
        assert len(s) == len(p) + NEW - 1
        np.testing.assert_allclose(c.score, s[len(p) - 1:].sum(), rtol=1e-4)


def test_best_of_returns_the_highest_scoring_sample(llama):
    _, sampler, _ = llama
    params = SamplingParams(temperature=1.0, top_k=50)
    samples = sampler.generate([Request(PROMPTS[0], NEW)] * 3, params, seed=3)
    best = sampler.best_of([Request(PROMPTS[0], NEW)], 3, params, seed=3)[0]
    assert len({tuple(s.tokens) for s in samples}) > 1  # the samples differ
    assert best.tokens == max(samples, key=lambda c: c.score).tokens
    scored = sampler.score([PROMPTS[0] + best.tokens])[0]
    np.testing.assert_allclose(best.score, scored[len(PROMPTS[0]) - 1:].sum(), rtol=1e-4)


def test_beam_search_with_one_beam_is_greedy(llama):
    _, sampler, greedy = llama
    out = sampler.beam_search([Request(p, NEW) for p in PROMPTS], beams=1)
    assert [beams[0].tokens for beams in out] == greedy


class _BigramLM:
    """A toy model whose next-token logits depend only on the current token."""

    def __init__(self, logprobs_VxV):
        self.table = jnp.asarray(logprobs_VxV, jnp.float32)

    def init_cache(self, batch, max_len):
        return {}

    def step(self, params, cache, tokens_BxL, positions_BxL, valid_BxL):
        return self.table[tokens_BxL], cache


@pytest.mark.slow
def test_beam_search_finds_a_sequence_greedy_misses():
    # From 1: p(2)=.6, p(3)=.4; from 2 every token .25; from 3 p(1)=.95. Greedy takes 1,2,x
    # (p=.15); two beams find 1,3,1 (p=.38).
    probs = np.full((5, 5), 1e-6)
    probs[1, [2, 3]] = [0.6, 0.4]
    probs[2, 1:] = 0.25
    probs[3, 1] = 0.95
    probs[3, 2:] = 0.05 / 3
    probs[[0, 4], 1:] = 0.25
    lm = _BigramLM(np.log(probs / probs.sum(1, keepdims=True)))
    args = (None, jnp.asarray([[1]]), jnp.asarray([[True]]), jnp.asarray([2]),
            jnp.asarray([[-1]]))
    greedy = decode.sample(lm, *args, processing.as_arrays(SamplingParams()),
                           jax.random.key(0), max_new=2, pad_id=0)
    beams = decode.beam_search(lm, *args, beams=2, max_new=2, pad_id=0, length_penalty=0.0)
    assert greedy["tokens"][0].tolist()[0] == 2
    assert beams["tokens"][0, 0].tolist() == [3, 1]
    np.testing.assert_allclose(beams["scores"][0, 0], np.log(0.4 * 0.95), rtol=1e-4)
    assert beams["scores"][0, 0] > greedy["logprob"][0]
    # The default length penalty 1.0 (transformers') divides by the 2 new tokens.
    normalised = decode.beam_search(lm, *args, beams=2, max_new=2, pad_id=0)
    np.testing.assert_allclose(normalised["scores"][0, 0], np.log(0.4 * 0.95) / 2, rtol=1e-4)


def test_finished_beams_free_their_slot_for_open_ones():
    """From 1: p(stop)=.5, p(2)=.3, p(3)=.2; then 2 -> 3 and 3 -> 2 with p=.9. With two beams
    the stopped hypothesis [4] is kept and two open beams still search, so the second best
    hypothesis is [2, 3] (p=.27), not a second copy of a frozen one."""
    probs = np.full((5, 5), 1e-6)
    probs[1, [4, 2, 3]] = [0.5, 0.3, 0.2]
    probs[2, 3], probs[3, 2] = 0.9, 0.9
    probs[2, [1, 2, 4]] = probs[3, [1, 3, 4]] = 0.1 / 3
    probs[[0, 4], 1:] = 0.25
    lm = _BigramLM(np.log(probs / probs.sum(1, keepdims=True)))
    out = decode.beam_search(lm, None, jnp.asarray([[1]]), jnp.asarray([[True]]),
                             jnp.asarray([2]), jnp.asarray([[4]]), beams=2, max_new=2, pad_id=0,
                             length_penalty=0.0)
    assert out["tokens"][0, :, :2].tolist() == [[4, 0], [2, 3]]
    assert out["lengths"][0].tolist() == [1, 2]
    np.testing.assert_allclose(out["scores"][0], np.log([0.5, 0.3 * 0.9]), rtol=1e-4)


@pytest.mark.slow
def test_speculative_greedy_equals_target_greedy(llama):
    """A smaller, unrelated draft (1 layer, other weights): the output is still the target's."""
    _, sampler, greedy = llama
    draft_cfg = dataclasses.replace(LLAMA, num_layers=1, d_ff=32)
    out = sampler.speculative([Request(p, NEW) for p in PROMPTS], draft_cfg,
                              _params(draft_cfg, seed=7), num_draft=3)
    assert [c.tokens for c in out] == greedy
    assert 0.0 <= sampler.last_acceptance_rate < 1.0


@pytest.mark.slow
def test_speculative_with_the_target_as_draft_accepts_everything(llama):
    params, sampler, greedy = llama
    out = sampler.speculative([Request(p, NEW) for p in PROMPTS], LLAMA, params, num_draft=3)
    assert [c.tokens for c in out] == greedy
    assert sampler.last_acceptance_rate == 1.0


@pytest.mark.slow
def test_sharded_decode_equals_unsharded(llama):
    params, _, greedy = llama
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "pipeline": 2})
    sampled = Sampler(LLAMA, shard_params(LLAMA, params, mesh), mesh=mesh)
    requests = [Request(p, NEW) for p in PROMPTS] + [Request(PROMPTS[0], NEW)]
    out = sampled.generate(requests)
    assert [c.tokens for c in out] == greedy + greedy[:1]
    wq = sampled.params["blocks"]["attn"]["wq"]
    assert "tensor" in str(wq.sharding.spec)  # heads really are split over the tensor axis


# -- filters against numpy ----------------------------------------------------------------


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits():
    return np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 2


def test_top_k_matches_numpy():
    x = _logits()
    for k in (1, 5, 50):
        ref = np.where(x >= np.sort(x, -1)[:, ::-1][:, k - 1:k], x, -np.inf)
        np.testing.assert_array_equal(np.asarray(processing.top_k(jnp.asarray(x), k)), ref)
    np.testing.assert_array_equal(np.asarray(processing.top_k(jnp.asarray(x), 0)), x)


def test_top_p_matches_numpy():
    x = _logits()
    for p in (0.1, 0.5, 0.9):
        ref = np.full_like(x, -np.inf)
        for b in range(len(x)):
            order = np.argsort(-x[b])
            probs = _np_softmax(x[b])[order]
            mass = 0.0
            for i, tok in enumerate(order):
                if i > 0 and mass >= p:
                    break
                ref[b, tok] = x[b, tok]
                mass += probs[i]
        np.testing.assert_array_equal(np.asarray(processing.top_p(jnp.asarray(x), p)), ref)


def test_min_p_matches_numpy():
    x = _logits()
    for m in (0.05, 0.3):
        probs = _np_softmax(x)
        ref = np.where(probs >= m * probs.max(-1, keepdims=True), x, -np.inf)
        np.testing.assert_array_equal(np.asarray(processing.min_p(jnp.asarray(x), m)), ref)


def test_repetition_penalty_formula():
    x = _logits()
    seen = np.zeros_like(x, bool)
    seen[:, ::3] = True
    ref = np.where(seen, np.where(x > 0, x / 1.3, x * 1.3), x)
    out = processing.repetition_penalty(jnp.asarray(x), jnp.asarray(seen), 1.3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6)


def test_greedy_choice_respects_repetition_penalty_and_sampling_the_filters():
    x = jnp.asarray([[3.0, 2.9, -1.0, -5.0]])
    seen = jnp.asarray([[True, False, False, False]])
    greedy = processing.as_arrays(SamplingParams(repetition_penalty=2.0))
    assert int(processing.choose(jax.random.key(0), x, seen, greedy)[0]) == 1
    top2 = processing.as_arrays(SamplingParams(temperature=5.0, top_k=2))
    draws = jax.vmap(lambda k: processing.choose(k, x, seen * False, top2))(
        jax.random.split(jax.random.key(1), 200))
    assert set(np.unique(np.asarray(draws))) == {0, 1}


def test_bad_sampling_settings_name_the_setting():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0).check()
