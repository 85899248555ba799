"""Imported Hugging Face models of each supported family against transformers: per-token
log-probs on a sequence longer than any sliding window, the KV-cache greedy decode of 64 new
tokens token for token, and `jaxlm.tools.generate` (text and --chat) on a tokenizer.json model.

The HF models are tiny, random and built locally (nothing is downloaded)."""

import io
import os

import numpy as np
import pytest
import torch
import transformers

from jaxlm.inference.sampler import Request, Sampler
from jaxlm.tools import generate
from jaxlm.weights.hf import convert as hf
from jaxlm.weights.restore import restore
from tests.hf_tokenizer_fixtures import write_hf_tokenizer

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

NEW_TOKENS = 64
_DENSE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              vocab_size=512)
FAMILIES = {
    # Llama 3.2: llama3 RoPE scaling over an original context shorter than the sequences.
    "llama3.2": (transformers.LlamaConfig, dict(
        _DENSE, tie_word_embeddings=True, rope_theta=5e5, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "qwen2.5": (transformers.Qwen2Config, dict(_DENSE, tie_word_embeddings=True,
                                               rope_theta=1e6)),
    # A window of 16 tokens on 88-token sequences (ring-buffer KV cache).
    "mistral": (transformers.MistralConfig, dict(_DENSE, sliding_window=16)),
    # Local (window 16) then global layers; attention and final logit soft-capping, with caps
    # low enough to bend most scores and logits; eager attention in transformers.
    "gemma2": (transformers.Gemma2Config, dict(
        _DENSE, head_dim=8, query_pre_attn_scalar=16, sliding_window=16,
        attn_logit_softcapping=1.0, final_logit_softcapping=1.5, attn_implementation="eager")),
    # q/k norms; local layers with their own RoPE base, global ones with linear scaling.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        _DENSE, head_dim=8, query_pre_attn_scalar=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=512, n_positions=128, n_embd=32,
                                           n_layer=2, n_head=4, n_inner=48)),
}
PROMPT = np.random.default_rng(1).integers(5, 400, 24).tolist()


def _hf_model(family, seed=0):
    config_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _import(family, tmp_path):
    model = _hf_model(family)
    model.save_pretrained(str(tmp_path / "hf"))
    write_hf_tokenizer(str(tmp_path / "hf"), "llama3")
    hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "jx"))
    return model, restore(str(tmp_path / "jx"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logprobs_and_greedy_decode_match_transformers(family, tmp_path):
    model, loaded = _import(family, tmp_path)
    sampler = Sampler(loaded.model_cfg, loaded.params, pad_id=0)
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                              do_sample=False, min_new_tokens=NEW_TOKENS)[0, len(PROMPT):]
    got = sampler.generate([Request(PROMPT, NEW_TOKENS)])[0].tokens
    assert got == want.tolist()

    sequence = PROMPT + want.tolist()  # 88 tokens
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].double()
    want_logp = torch.log_softmax(logits, -1)[:-1].gather(
        1, torch.tensor(sequence[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(sampler.score([sequence])[0], want_logp, atol=1e-4, rtol=0)


def test_generate_prints_text_and_chats_with_the_model_template(tmp_path, capsys):
    _import("llama3.2", tmp_path)
    workdir = str(tmp_path / "jx")
    assert os.path.isfile(os.path.join(workdir, "tokenizer.json"))
    out = io.StringIO()
    generate.run(generate.Options(workdir=workdir, prompts=("def f(x):",), max_new_tokens=8),
                 stdout=out)
    text = out.getvalue()
    assert text.startswith("def f(x):") and len(text.splitlines()[0]) > len("def f(x):")

    session = generate._Session(generate.Options(workdir=workdir, chat=True))
    prompts = []
    session_generate = session.generate
    session.generate = lambda texts, **kw: prompts.extend(texts) or session_generate(texts, **kw)
    out = io.StringIO()
    generate.chat_loop(session, io.StringIO("hello there\n"), out)
    assert out.getvalue().startswith("assistant: ")
    # The model's own (Llama 3) template, without the BOS the sampler puts first itself.
    assert prompts == ["<|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n"]
    assert session.encode_prompt(prompts[0])[0] == session.tok.bos_id

    hf.export_hf(workdir, str(tmp_path / "out"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        session.tok.apply_chat_template([{"role": "user", "content": "hi"}])
