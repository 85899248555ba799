"""Speculative decoding keeps the target's distribution: a chi-square test of the sampled
tokens against the target's exact probabilities, and exact greedy output at temperature 0 with
a repetition penalty."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlm.inference import Request, Sampler, SamplingParams, decode, processing, speculative
from jaxlm.models import ModelConfig, Transformer
from tests.model_fixtures import init_params

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

V = 6  # real vocabulary (padded to 128 rows, masked)
# init_std 0.4: peaked, clearly different target and draft distributions.
TARGET = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, d_ff=64, max_seq_len=32, init_std=0.4)
DRAFT = dataclasses.replace(TARGET, num_layers=1, d_ff=32)
PROMPT = [1, 2, 3]
DRAWS = 3000
SAMPLING = SamplingParams(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3)
ALPHA = 1e-3  # significance of the chi-square test


def _params(cfg, seed):
    return init_params(cfg, seed)


def _exact_joint(cfg, params, sampling):
    """P(t1, t2, t3) [V, V, V] of plain sampling after PROMPT, from full forward passes."""
    seqs = np.array([PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    logits = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(seqs))
    p = len(PROMPT)
    vp = logits.shape[-1]
    probs = []
    for i in range(3):  # position p-1+i predicts t_{i+1}, having seen the prompt and t_1..t_i
        seen = np.zeros((len(seqs), vp), bool)
        for r, s in enumerate(seqs):
            seen[r, s[:p + i]] = True
        row = jax.nn.softmax(processing.process(logits[:, p - 1 + i], jnp.asarray(seen),
                                                processing.as_arrays(sampling)), axis=-1)
        probs.append(np.asarray(row)[:, :V].reshape(V, V, V))
    p1, p2, p3 = probs[0][0, 0], probs[1][:, 0], probs[2]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square(counts, expected_probs):
    """Statistic and p-value, cells with expected count < 5 pooled into one."""
    expected = expected_probs.ravel() * counts.sum()
    counts = counts.ravel()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum())


def test_speculative_sampling_matches_the_target_distribution():
    target_params, draft_params = _params(TARGET, 1), _params(DRAFT, 2)
    run = jax.jit(functools.partial(
        speculative.speculative_decode, decode.TransformerLM(TARGET), target_params,
        decode.TransformerLM(DRAFT), draft_params, num_draft=2, max_new=3, pad_id=0))
    tokens = jnp.asarray(np.tile(PROMPT, (DRAWS, 1)), jnp.int32)
    out = run(tokens, jnp.ones_like(tokens, bool), jnp.full((DRAWS,), 3, jnp.int32),
              jnp.full((DRAWS, 1), -1, jnp.int32), processing.as_arrays(SAMPLING),
              jax.random.key(0))
    samples = np.asarray(out["tokens"])
    assert np.all(np.asarray(out["lengths"]) == 3) and samples.max() < V
    acceptance = int(out["accepted"]) / int(out["proposed"])
    assert 0.05 < acceptance < 0.95  # rejections (and residual draws) really happen
    counts = np.zeros((V, V, V))
    np.add.at(counts, tuple(samples.T), 1)
    target = _exact_joint(TARGET, target_params, SAMPLING)
    assert abs(target.sum() - 1) < 1e-4
    _, p_value = _chi_square(counts, target)
    assert p_value > ALPHA, p_value
    # The test has the power to tell: the draft's own distribution is rejected outright.
    draft = _exact_joint(DRAFT, draft_params, SAMPLING)
    assert _chi_square(counts, draft)[1] < 1e-12
    assert 0.5 * np.abs(target - draft).sum() > 0.2


def test_greedy_with_repetition_penalty_equals_plain_greedy():
    target_params, draft_params = _params(TARGET, 1), _params(DRAFT, 2)
    sampler = Sampler(TARGET, target_params)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    requests = [Request([1, 2, 3], 12), Request([4, 5], 9), Request([2], 12)]
    want = [c.tokens for c in sampler.generate(requests, greedy)]
    got = sampler.speculative(requests, DRAFT, draft_params, num_draft=3, sampling=greedy)
    assert [c.tokens for c in got] == want
    # The penalty changes the greedy decode here, so it is applied, and applied alike.
    plain = [c.tokens for c in sampler.generate(requests, SamplingParams())]
    assert plain != want
    assert 0.0 < sampler.last_acceptance_rate < 1.0


def test_generate_refuses_options_that_cannot_be_combined():
    from jaxlm.tools import generate

    base = dict(workdir="/nonexistent", prompts=("def ",))
    clashes = [({"num_beams": 2, "temperature": 0.7}, "--num_beams with --temperature"),
               ({"num_beams": 2, "top_k": 5}, "--num_beams with sampling filters"),
               ({"num_beams": 2, "draft_workdir": "d"}, "--num_beams with --draft_workdir"),
               ({"best_of": 3, "temperature": 1.0, "draft_workdir": "d"},
                "--best_of with --draft_workdir"),
               ({"best_of": 3}, "--best_of with --temperature=0")]
    for kwargs, message in clashes:
        with pytest.raises(ValueError, match=message):
            generate.run(generate.Options(**base, **kwargs))  # refused before loading
    # Sampling with a draft is one of the combinations that work.
    generate.check_combination(generate.Options(**base, draft_workdir="d", temperature=0.8,
                                                top_p=0.9))
