"""HFTokenizer (a Hugging Face tokenizer.json) against transformers' tokenizer of the same files:
ids, special tokens, and the Jinja chat template, as text and as masked SFT tokens."""

import pickle

import numpy as np
import pytest
import transformers

from jaxlm.data import chat
from jaxlm.data.tokenizer import load_tokenizer
from tests.hf_tokenizer_fixtures import MIXED_TEXT, write_hf_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is   def f(x)?"},
                {"role": "assistant", "content": "A function 😀 named f."},
                {"role": "user", "content": "and class?"},
                {"role": "assistant", "content": "A type."}]


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def tokenizers(request, tmp_path_factory):
    path = write_hf_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.rsplit("/", 1)[0]))
    return load_tokenizer(path), reference


def test_ids_and_special_tokens_equal_transformers(tokenizers):
    tok, ref = tokenizers
    for text in (MIXED_TEXT, "", " leading", "x" * 300, "\n\n\n"):
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([MIXED_TEXT, "a b"]) == [tok.encode(MIXED_TEXT), tok.encode("a b")]
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == ref.eos_token_id
    assert tok.bos_id == (ref.bos_token_id if ref.bos_token_id is not None else -1)
    with_special = ref(MIXED_TEXT)["input_ids"]
    assert with_special[:1] == ([tok.bos_id] if tok.add_bos else tok.encode(MIXED_TEXT)[:1])
    assert tok.piece_to_id(tok.id_to_piece(42)) == 42
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT) and again.sha256 == tok.sha256


def test_chat_template_renders_like_transformers(tokenizers):
    tok, ref = tokenizers
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]):
        for gen in (False, True):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_sft_tokens_and_mask_from_the_tokenizer_template(tokenizers):
    tok, ref = tokenizers
    template = chat.ChatTemplate(from_tokenizer=True)
    ids, mask = chat.render_tokens(tok, CONVERSATION, template=template)
    want = ref.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids.tolist() == list(want)
    trained = tok.decode(ids[mask == 1])
    assert "A function 😀 named f." in trained and "A type." in trained
    assert "Be brief" not in trained and "class" not in trained
    assert "assistant" not in trained  # role headers are not trained
    # A prompt plus its response tokenizes like the whole conversation.
    prompt = chat.prompt_ids(tok, CONVERSATION[:4], template=template)
    response = chat.response_ids(tok, "A type.", template=template)
    np.testing.assert_array_equal(np.concatenate([prompt, response]), ids)
    # generate --chat: the prompt text without the BOS the sampler adds itself.
    text = chat.generation_prompt(tok, CONVERSATION[:2], add_bos=tok.add_bos)
    full = ref.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == (full[len(ref.bos_token):] if tok.add_bos else full)
