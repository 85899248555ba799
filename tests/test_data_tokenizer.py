"""Tokenizer: lossless round trips with byte fallback, special ids, vocab checks, training tool."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from jaxlm.data.tokenizer import Tokenizer, load_tokenizer, sidecar_path
from tests import data_fixtures as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return F.train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text", [
    "doc-1 the state of the world, 42 = 6 * 7.\n",
    "  leading and trailing spaces  \n\n\tand a tab",
    "    def f(self):\n        return None\n",
    "café naïve über 東京 данные",
    "never seen: 🤖 ∑ ǅ ꙮ \x00 \x7f \u200b",
])
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    ids = tok.encode("🤖")
    assert len(ids) == 4 and all(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.unk_id not in ids


def test_ids_outside_the_vocabulary_decode_as_unknown(tok):
    assert tok.decode([*tok.encode("the"), tok.vocab_size + 5]) == "the \u2047 "


def test_special_ids_and_sidecar(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 2, 3, 1)
    assert tok.vocab_size == 320
    assert tok.special_tokens == {"<|user|>": 4, "<|assistant|>": 5}
    assert tok.encode("<|user|>hi<|assistant|>")[0] == 4
    assert 2 not in tok.encode("<s>")  # control pieces are never produced from text
    with open(sidecar_path(tok.path)) as f:
        ids = json.load(f)
    assert ids["bos_id"] == 2 and ids["vocab_size"] == 320
    assert ids["special_tokens"] == {"<|user|>": 4, "<|assistant|>": 5}


def test_pickles_without_the_file(tok, tmp_path):
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("doc-3 the") == tok.encode("doc-3 the") and copy.path == tok.path


def test_vocab_larger_than_the_model_is_an_error_naming_the_key(tok):
    tok.check_fits(320)
    with pytest.raises(ValueError, match=rf"config key model.vocab_size: 256 .* {tok.path}"):
        tok.check_fits(256)


def test_missing_and_corrupt_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer /no/such.model does not exist"):
        load_tokenizer("/no/such.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=f"{bad}: not a sentencepiece model"):
        load_tokenizer(str(bad))


def test_train_tokenizer_tool_on_jsonl_and_parquet(tmp_path):
    docs = F.synthetic_documents(200, seed=9)
    jsonl = F.write_jsonl(str(tmp_path / "a.jsonl"), docs[:100], field="content")
    parquet = F.write_parquet(str(tmp_path / "b.parquet"), docs[100:], field="content")
    out = str(tmp_path / "out" / "t.model")
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.tools.train_tokenizer",
         f"--input={jsonl},{parquet}", "--text_field=content", f"--output={out}",
         "--vocab_size=340", "--model_type=unigram", "--num_threads=1",
         "--special_tokens=<|im_start|>,<|im_end|>", "--bos_piece=<|begin|>"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    t = load_tokenizer(out)
    assert t.vocab_size == 340 and t.special_tokens == {"<|im_start|>": 4, "<|im_end|>": 5}
    assert t.id_to_piece(t.bos_id) == "<|begin|>"
    assert t.decode(t.encode(docs[150])) == docs[150]
