"""RoPE context extension (models/rope.py) against transformers' rotary embeddings: the same
frequencies (to float32 rounding) and the same rotated queries, out to long-context positions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from jaxlm.models.rope import RopeScaling, apply_rope, inv_frequencies
from jaxlm.weights.hf import config as hf_config

HEAD_DIM, THETA, MAX_LEN = 64, 500000.0, 2048
# name: (transformers rope parameters, jaxlm RopeScaling)
CASES = {
    "llama3": (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=256),
               RopeScaling("llama3", 8.0, 256, 1.0, 4.0)),
    "linear": (dict(rope_type="linear", factor=4.0), RopeScaling("linear", 4.0)),
    "dynamic": (dict(rope_type="dynamic", factor=2.0), RopeScaling("dynamic", 2.0, MAX_LEN)),
    "yarn": (dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=128,
                  beta_fast=32.0, beta_slow=1.0), RopeScaling("yarn", 16.0, 128)),
    "yarn_no_truncate": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512,
                              truncate=False, attention_factor=1.3),
                         RopeScaling("yarn", 4.0, 512, attention_factor=1.3, truncate=False)),
}


def _hf_rotary(params):
    config = transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MAX_LEN,
        rope_parameters={**params, "rope_theta": THETA})
    return config, modeling_llama.LlamaRotaryEmbedding(config)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_and_rotation_match_transformers(case):
    params, scaling = CASES[case]
    config, rotary = _hf_rotary(params)
    # Past the original context, and (dynamic) past max_position_embeddings so the base grows.
    positions = np.array([[0, 1, 255, 256, 1000, 4095, 60000, 131071]])
    seq_len = positions.max() + 1
    if case == "dynamic":
        want, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["dynamic"](
            config, None, seq_len=int(seq_len))
    else:
        want = rotary.inv_freq
    got = np.asarray(inv_frequencies(HEAD_DIM, THETA, scaling, jnp.asarray(seq_len)))
    np.testing.assert_allclose(got, want.numpy(), rtol=4e-7, atol=0)  # a few float32 ulp

    q = np.random.default_rng(0).normal(size=(1, positions.shape[1], 2, HEAD_DIM))
    q = q.astype(np.float32)
    q_t = torch.tensor(q).transpose(1, 2)  # transformers: [B, H, L, K]
    with torch.no_grad():
        cos, sin = rotary(q_t, torch.tensor(positions))
        want_q, _ = modeling_llama.apply_rotary_pos_emb(q_t, q_t, cos, sin)
    got_q = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(positions), THETA, scaling))
    # A frequency one ulp apart turns position p by ~p * 1e-7 more: the bound grows with p.
    err_L = np.abs(got_q - want_q.transpose(1, 2).numpy()).max(axis=(0, 2, 3))
    assert np.all(err_L <= 2e-5 + 1e-6 * positions[0]), err_L


@pytest.mark.parametrize("case", list(CASES))
def test_config_json_round_trip(case):
    """config.json -> model.rope_scaling -> config.json -> the same transformers frequencies."""
    params, scaling = CASES[case]
    hf = dict(model_type="llama", vocab_size=300, hidden_size=HEAD_DIM * 2, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_LEN,
              rope_parameters={**params, "rope_theta": THETA})
    fields = hf_config.model_fields(hf)
    got = RopeScaling(**fields["rope_scaling"])
    np.testing.assert_allclose(inv_frequencies(HEAD_DIM, THETA, got),
                               inv_frequencies(HEAD_DIM, THETA, scaling), rtol=1e-7)
    from jaxlm.models.config import ModelConfig
    cfg = ModelConfig(**{k: v for k, v in fields.items() if k != "rope_scaling"},
                      rope_scaling=got)
    back = hf_config.hf_config(cfg, "float32")
    assert hf_config.model_fields(back)["rope_scaling"] == {
        **fields["rope_scaling"], **({"attention_factor": got.attention_factor or 1.0 +
                                      0.1 * np.log(got.factor), "truncate": got.truncate,
                                      "beta_fast": 32.0, "beta_slow": 1.0}
                                     if got.kind == "yarn" else {}),
        **({"low_freq_factor": 1.0, "high_freq_factor": 4.0} if got.kind == "llama3" else {})}


def test_unsupported_rope_types_name_the_key():
    hf = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match="config.json key rope_scaling.rope_type: 'longrope'"):
        hf_config.model_fields({**hf, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="config key model.rope_scaling.original_max_len"):
        from jaxlm.models.config import ModelConfig
        ModelConfig(vocab_size=8, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=16, d_ff=8, max_seq_len=8,
                    rope_scaling=RopeScaling("llama3", 8.0)).check()
