"""jaxlm/tools/convert_hf.py: tiny random transformers models -> jaxlm -> transformers, logits
equal.

The HF models are built locally (CPU torch, random weights, save_pretrained); nothing is
downloaded.
"""

import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer
from jaxlm.run import config as config_lib
from jaxlm.weights import restore
from jaxlm.weights.hf import config as hf_config
from jaxlm.weights.hf import convert as hf
from jaxlm.weights.hf import safetensors_io
from tests.data_fixtures import train_tiny_tokenizer

_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6)
# name: (config class, config kwargs, max_shard_size of save_pretrained)
CASES = {
    # GQA (2 kv heads for 4 query heads), untied head, vocab 330 padded to 384, 5 files.
    "llama_gqa_sharded": (transformers.LlamaConfig,
                          dict(_LLAMA, vocab_size=330, num_key_value_heads=2, rope_theta=5000.0,
                               tie_word_embeddings=False), "30KB"),
    # Llama 3.2 shape: llama3 RoPE scaling with an original context shorter than the sequence.
    "llama3_rope_scaling": (transformers.LlamaConfig,
                            dict(_LLAMA, vocab_size=300, num_key_value_heads=2, rope_theta=5e5,
                                 tie_word_embeddings=True, rope_scaling=dict(
                                     rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8)),
                            None),
    "llama_tied": (transformers.LlamaConfig,
                   dict(_LLAMA, vocab_size=256, num_key_value_heads=4, tie_word_embeddings=True),
                   None),
    # MQA, head_dim 16 != hidden_size / heads.
    "mistral_mqa_head_dim": (transformers.MistralConfig,
                             dict(_LLAMA, vocab_size=300, num_key_value_heads=1, head_dim=16,
                                  sliding_window=None, rope_theta=1e6), None),
    # A sliding window shorter than the 12 test tokens (exports as Mistral again).
    "window_mistral": (transformers.MistralConfig,
                       dict(_LLAMA, vocab_size=300, num_key_value_heads=2, sliding_window=5),
                       None),
    # Qwen2 with every layer local, and q/k/v biases.
    "window_qwen2": (transformers.Qwen2Config,
                     dict(_LLAMA, vocab_size=300, num_key_value_heads=2, use_sliding_window=True,
                          sliding_window=4, max_window_layers=0), None),
    # Gemma 3: local layer (window 5 < 12 tokens) then global; q/k norms, two RoPE bases.
    "gemma3": (transformers.Gemma3TextConfig,
               dict(_LLAMA, vocab_size=300, num_key_value_heads=2, head_dim=8,
                    query_pre_attn_scalar=12, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention"], rope_parameters={
                        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               None),
    "gemma2": (transformers.Gemma2Config,
               dict(_LLAMA, vocab_size=300, num_key_value_heads=2, head_dim=8,
                    sliding_window=5, attn_logit_softcapping=None,
                    final_logit_softcapping=None), None),
    # Gemma 2 as released: attention and final logit soft-capping, here with caps low enough
    # to bend most scores and logits (asserted below); eager attention in transformers.
    "gemma2_softcap": (transformers.Gemma2Config,
                       dict(_LLAMA, vocab_size=300, num_key_value_heads=2, head_dim=8,
                            sliding_window=5, attn_logit_softcapping=1.0,
                            final_logit_softcapping=1.5, attn_implementation="eager"), None),
    # q/k/v biases, tied.
    "qwen2_bias": (transformers.Qwen2Config,
                   dict(_LLAMA, vocab_size=300, num_key_value_heads=2,
                        tie_word_embeddings=True), None),
    "gpt2": (transformers.GPT2Config,
             dict(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48),
             None),
}
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12))


def _random_hf_model(config_cls, kwargs, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too: every mapping is exercised
            p.normal_(0.0, 0.2)
    return model


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _load_config_file(path):
    spec = importlib.util.spec_from_file_location("imported_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _restore_like_init_from(config):
    """What `init_from` does: the model of the run config, params restored into its shapes."""
    cfg = config_lib.model_config(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            hf.abstract_params(cfg))
    return cfg, restore.restore(config.init_from.path, model_cfg=cfg,
                                abstract_params=abstract).params


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))).path


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_import_logits_match_transformers_and_export_round_trips(case, tmp_path,
                                                                   tokenizer_file):
    config_cls, kwargs, shard_size = CASES[case]
    model = _random_hf_model(config_cls, kwargs, seed=len(case))
    hf_dir = str(tmp_path / "hf")
    model.save_pretrained(hf_dir, max_shard_size=shard_size or "1GB")
    if shard_size:
        assert len(safetensors_io.weight_files(hf_dir)) > 1
    with_tokenizer = case == "llama_gqa_sharded"
    if with_tokenizer:
        shutil.copyfile(tokenizer_file, os.path.join(hf_dir, "tokenizer.model"))
    reference = _hf_logits(model)
    vocab = kwargs["vocab_size"]

    hf.import_hf(hf_dir, str(tmp_path / "jx"))
    config = _load_config_file(str(tmp_path / "jx" / "config.py"))
    config_lib.validate(config)
    assert config.init_from.path == str(tmp_path / "jx" / "checkpoints")
    if with_tokenizer:
        assert config.data.tokenizer_path == str(tmp_path / "jx" / "tokenizer.model")
        with open(config.data.tokenizer_path, "rb") as a, open(tokenizer_file, "rb") as b:
            assert a.read() == b.read()
    cfg, params = _restore_like_init_from(config)
    logits = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, TOKENS))
    assert logits.shape[-1] == cfg.padded_vocab_size
    assert np.all(logits[..., vocab:] == -1e9)
    np.testing.assert_allclose(logits[..., :vocab], reference, atol=1e-4, rtol=0)
    for key in ("attn_logit_softcap", "final_logit_softcap"):  # each cap changes the logits
        if getattr(cfg, key):
            uncapped = jax.jit(Transformer(dataclasses.replace(cfg, **{key: 0.0})).apply)(
                {"params": params}, TOKENS)
            assert np.max(np.abs(np.asarray(uncapped)[..., :vocab] - reference)) > 0.05, key
    embed = np.asarray(params["embed"])
    assert np.all(embed[vocab:] == 0)  # padding rows

    out_dir = str(tmp_path / "hf_out")
    files = hf.export_hf(str(tmp_path / "jx"), out_dir, max_shard_bytes=40_000 if shard_size
                         else 2**30)
    assert (len(files) > 1) == bool(shard_size)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    # Mistral without a sliding window is a Llama: it comes back as one.
    expected = transformers.LlamaForCausalLM if case.startswith("mistral") else type(model)
    assert type(exported) is expected
    np.testing.assert_allclose(_hf_logits(exported), reference, atol=1e-4, rtol=0)
    original, again = model.state_dict(), exported.state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    if with_tokenizer:
        assert os.path.isfile(os.path.join(out_dir, "tokenizer.model"))

    # jaxlm -> HF -> jaxlm is exact as well (padding rows are zero on both sides).
    hf.import_hf(out_dir, str(tmp_path / "jx2"))
    _, params_again = _restore_like_init_from(
        _load_config_file(str(tmp_path / "jx2" / "config.py")))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(params_again))


def test_export_bfloat16_loads_in_transformers(tmp_path):
    model = _random_hf_model(*CASES["gpt2"][:2], seed=1)
    model.save_pretrained(str(tmp_path / "hf"))
    hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "jx"))
    hf.export_hf(str(tmp_path / "jx" / "checkpoints"), str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"),
                                                                 dtype=torch.bfloat16)
    for name, value in model.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), exported.state_dict()[name]), name


def _llama_json(**overrides):
    base = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64)
    return {**base, **overrides}


@pytest.mark.parametrize("hf_json, key", [
    (_llama_json(rope_scaling={"rope_type": "longrope", "factor": 8.0}),
     "rope_scaling.rope_type"),
    (_llama_json(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                  "short_factor": [1.0]}), "rope_parameters.short_factor"),
    (_llama_json(model_type="qwen2", use_sliding_window=True, sliding_window=16,
                 max_window_layers=1), "max_window_layers"),
    (_llama_json(layer_types=["chunked_attention", "full_attention"]), "layer_types"),
    (_llama_json(attention_bias=True), "attention_bias"),
    (_llama_json(mlp_bias=True), "mlp_bias"),
    (_llama_json(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="gpt2", vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4,
          activation_function="relu"), "activation_function"),
    (_llama_json(model_type="falcon"), "model_type"),
    (_llama_json(model_type="gemma2", attn_logit_softcapping=-50.0), "attn_logit_softcapping"),
])
def test_unsupported_hf_features_name_the_config_json_key(hf_json, key):
    with pytest.raises(ValueError, match=f"config.json key {key}:"):
        hf_config.model_fields(hf_json)


def test_hf_config_reads_both_rope_spellings():
    old = hf_config.model_fields(_llama_json(rope_theta=5e5, rope_scaling=None))
    new = hf_config.model_fields(_llama_json(rope_parameters={"rope_type": "default",
                                                              "rope_theta": 5e5}))
    assert old == new and old["rope_theta"] == 5e5
    # a window covering every position is plain causal attention
    assert hf_config.model_fields(_llama_json(model_type="mistral", sliding_window=64))


def test_export_rejects_models_without_a_hf_architecture():
    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=1, num_heads=4, num_kv_heads=4,
                      head_dim=8, d_ff=64, max_seq_len=16, norm="layernorm")
    with pytest.raises(ValueError, match="model.norm"):
        hf_config.hf_config(cfg, "float32")
    capped = dataclasses.replace(cfg, norm="rmsnorm", final_logit_softcap=30.0)
    with pytest.raises(ValueError, match="model.final_logit_softcap"):  # no Llama caps logits
        hf_config.hf_config(capped, "float32")


def test_gpt2_hub_names_buffers_and_tensor_errors(tmp_path):
    """Hub GPT-2 files name tensors without `transformer.` and carry causal-mask buffers; a
    tensor the config does not have, or a missing one, is an error naming it."""
    from safetensors.numpy import load_file, save_file
    model = _random_hf_model(*CASES["gpt2"][:2], seed=2)
    model.save_pretrained(str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    hub["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    for name, files in (("hub", hub), ("extra", {**tensors, "transformer.h.9.ln_1.weight":
                                                 np.ones(32, np.float32)}),
                        ("missing", {k: v for k, v in tensors.items()
                                     if k != "transformer.h.1.mlp.c_fc.bias"})):
        os.makedirs(tmp_path / name)
        shutil.copyfile(tmp_path / "hf" / "config.json", tmp_path / name / "config.json")
        save_file(files, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "a"))
    hf.import_hf(str(tmp_path / "hub"), str(tmp_path / "b"))
    _, params_a = _restore_like_init_from(_load_config_file(str(tmp_path / "a" / "config.py")))
    _, params_b = _restore_like_init_from(_load_config_file(str(tmp_path / "b" / "config.py")))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_a),
                 jax.device_get(params_b))
    with pytest.raises(ValueError, match=r"does not have: \['transformer.h.9.ln_1.weight'\]"):
        hf.import_hf(str(tmp_path / "extra"), str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"):
        hf.import_hf(str(tmp_path / "missing"), str(tmp_path / "d"))


# -- beam search against transformers' generate(num_beams=...) ---------------------------------

BEAM_PROMPTS = [[5, 6, 7, 8], [40, 41, 9], [17]]
BEAM_NEW = 8


def _hf_beams(model, prompt, eos, beams, **kwargs):
    """transformers' finished hypotheses of one prompt: (new tokens up to and including the
    stop token, score), best first."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=beams, num_return_sequences=beams,
                             max_new_tokens=BEAM_NEW, eos_token_id=eos, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    hyps = []
    for row in out.sequences[:, len(prompt):].tolist():
        ends = [j for j, t in enumerate(row) if t in (eos or [])]
        hyps.append(row[:ends[0] + 1] if ends else row)
    return hyps, out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def beam_models(tmp_path_factory):
    from jaxlm.inference import Sampler

    kwargs = dict(_LLAMA, vocab_size=96, num_key_value_heads=2, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = _random_hf_model(transformers.LlamaConfig, kwargs, seed=3)
    root = tmp_path_factory.mktemp("beam")
    model.save_pretrained(str(root / "hf"))
    hf.import_hf(str(root / "hf"), str(root / "jx"))
    cfg, params = _restore_like_init_from(_load_config_file(str(root / "jx" / "config.py")))
    # Two stop tokens that the searches meet: tokens of the best unstopped beams.
    first = _hf_beams(model, BEAM_PROMPTS[0], None, 3)[0][0]
    second = _hf_beams(model, BEAM_PROMPTS[1], None, 3)[0][0]
    return model, Sampler(cfg, params, pad_id=0), [first[2], second[4]]


@pytest.mark.parametrize("beams,length_penalty,early_stopping", [
    (3, 1.0, False), (4, 2.0, "never"), (3, -0.5, True), (2, 0.0, False), (5, 1.0, "never")])
def test_beam_search_matches_transformers_token_for_token(beam_models, beams, length_penalty,
                                                          early_stopping):
    from jaxlm.inference import Request

    model, sampler, eos = beam_models
    ours = sampler.beam_search([Request(p, BEAM_NEW, eos) for p in BEAM_PROMPTS], beams,
                               length_penalty=length_penalty, early_stopping=early_stopping)
    stopped = 0
    for prompt, completions in zip(BEAM_PROMPTS, ours):
        hyps, scores = _hf_beams(model, prompt, eos, beams, length_penalty=length_penalty,
                                 early_stopping=early_stopping)
        assert [c.tokens for c in completions] == hyps
        np.testing.assert_allclose([c.score for c in completions], scores, atol=1e-4, rtol=0)
        stopped += sum(c.stopped for c in completions)
    assert stopped > 0  # finished-hypothesis bookkeeping is exercised, not only the budget
