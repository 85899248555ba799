"""Small synthetic corpora and a tiny tokenizer for the data tests (no downloads, no stdlib).

Every document starts with a tag `doc-<n> ` so tests can tell documents apart after tokenizing.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from jaxlm.data.config import default_data_config
from jaxlm.data.tokenizer import Tokenizer, train_sentencepiece

_WORDS = ("the a of to and in is it that for on with as was by at be this from or have an "
          "they which one you were her all she there would their we him been has when who will "
          "more no if out so said what up its about into than them can only other new some "
          "could time these two may then do first any my now such like our over man me even "
          "most made after also did many before must through back years where much your way "
          "well down should because each just those people how too little state good very make "
          "world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came "
          "right used take three def return class import self none true false lambda yield "
          "café naïve über straße 東京 данные").split()


def synthetic_documents(num_docs: int, seed: int = 0, min_words: int = 3,
                        max_words: int = 120, prefix: str = "doc") -> list[str]:
    """Deterministic documents of random words, numbers and punctuation, of varied lengths."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        n = int(rng.integers(min_words, max_words + 1))
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), size=n)]
        for k in rng.integers(0, n, size=max(1, n // 10)):
            words[k] = f"{words[k]}{rng.choice(['.', ',', ':', '()', ' ='])} {rng.integers(1000)}"
        docs.append(f"{prefix}-{i} " + " ".join(words) + ".\n")
    return docs


def write_jsonl(path: str, docs: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return path


def write_parquet(path: str, docs: list[str], field: str = "text",
                  row_group_size: int = 7) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path,
                   row_group_size=row_group_size)
    return path


def train_tiny_tokenizer(directory: str, vocab_size: int = 320) -> Tokenizer:
    """A byte-fallback BPE tokenizer of ~300 ids trained on 400 synthetic documents."""
    os.makedirs(directory, exist_ok=True)
    return train_sentencepiece(synthetic_documents(400, seed=123),
                               os.path.join(directory, "tiny.model"), vocab_size=vocab_size,
                               special_tokens=["<|user|>", "<|assistant|>"])


def files_config(paths: str, **overrides) -> ml_collections.ConfigDict:
    """A `data` section reading raw files, sized for fast tests."""
    data = default_data_config()
    data.source = "files"
    data.paths = paths
    data.seq_len = 32
    data.eval_fraction = 0.1
    data.prefetch_buffer_size = 0
    data.read_threads = 0
    for k, v in overrides.items():
        data[k] = v
    return data


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
