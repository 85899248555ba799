"""A sentencepiece tokenizer behind one small interface, and the training of one.

Tokenizers trained here are lossless: no normalisation, no dummy prefix, whitespace kept as is
(runs of spaces may form single pieces, so Python indentation is cheap), digits split, and byte
fallback, so any text, including characters never seen in training, round-trips exactly through
`decode(encode(text))`. Ids 0-3 are <pad>, <unk>, <s> (BOS) and </s> (EOS); user-defined special
tokens such as chat markers follow. Next to each `<name>.model` sits `<name>.json` with the
special-token ids, for tools that do not read sentencepiece protos.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from jaxlm.data import cache
from jaxlm.run.errors import ConfigError, DataError, UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Sentencepiece skips longer sentences; longer lines are cut into pieces of this many chars.
_MAX_SENTENCE_CHARS = 2000


class Tokenizer:
    """A loaded sentencepiece model: encode, decode, special ids and vocabulary size."""

    def __init__(self, path: str, model_proto: bytes | None = None):
        self.path = path
        if model_proto is None:
            with open(path, "rb") as f:
                model_proto = f.read()
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeErrors/OSErrors
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.special_tokens = _read_sidecar(path)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id; models without one pad with EOS (padding is masked anyway)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else max(self._sp.eos_id(), 0)

    @property
    def sha256(self) -> str:
        """Hash of the model bytes; data prepared with one tokenizer records it."""
        return hashlib.sha256(self._proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._sp.EncodeAsIds(text)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array."""
        return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.Encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; ids outside the vocabulary (e.g. a model's padded logits) read as UNK."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        flat = np.where((flat >= 0) & (flat < self.vocab_size), flat, max(self.unk_id, 0))
        return self._sp.DecodeIds(flat.tolist())

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)

    def check_fits(self, vocab_size: int, key: str = "model.vocab_size") -> None:
        """Raises naming `key` and this file if the model's `vocab_size` cannot hold our ids."""
        if self.vocab_size > vocab_size:
            raise ConfigError(f"config key {key}: {vocab_size} is smaller than the "
                             f"{self.vocab_size} ids of tokenizer {self.path}; raise it to at "
                             "least the tokenizer's vocabulary or use a matching tokenizer")

    def __getstate__(self) -> dict:
        # Grain worker processes receive the model bytes, not a path they might not see.
        return {"path": self.path, "model_proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a sentencepiece `.model`, or a Hugging Face `tokenizer.json` (as an `HFTokenizer`,
    same interface); raises FileNotFoundError/ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist (check data.tokenizer_path "
                                "or train one with jaxlm/tools/train_tokenizer.py)")
    try:
        if path.endswith(".json"):
            from jaxlm.data.hf_tokenizer import HFTokenizer
            return HFTokenizer(path)  # type: ignore[return-value]
        return Tokenizer(path)
    except (ValueError, UnicodeDecodeError) as e:  # a file that is no tokenizer (binary, ...)
        if isinstance(e, UserError):
            raise
        message = " ".join(str(e).split())
        raise DataError(message if path in message else f"{path}: not a readable tokenizer "
                        f"({type(e).__name__}: {message})", path=path) from None


def sidecar_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".json"


def _read_sidecar(model_path: str) -> dict[str, int]:
    path = sidecar_path(model_path)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {str(k): int(v) for k, v in json.load(f).get("special_tokens", {}).items()}


def training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines of `texts` (long ones cut), up to `max_chars` characters in total."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for start in range(0, len(line), _MAX_SENTENCE_CHARS):
                piece = line[start:start + _MAX_SENTENCE_CHARS]
                total += len(piece)
                if total > max_chars:
                    return
                yield piece


def train_sentencepiece(texts: Iterable[str], model_path: str, *, vocab_size: int,
                        model_type: str = "bpe", special_tokens: Sequence[str] = (),
                        byte_fallback: bool = True, max_chars: int = 20_000_000,
                        num_threads: int = 1, character_coverage: float = 0.9999,
                        pieces: dict[str, str] | None = None) -> Tokenizer:
    """Trains on the lines of `texts` and writes `model_path` and its `.json` sidecar atomically.

    The result depends only on the inputs and `num_threads` (sentencepiece merges differently
    with a different thread count), so every host that trains it gets the same model.
    `pieces` renames the control tokens: {"pad": ..., "unk": ..., "bos": ..., "eos": ...}.
    """
    pieces = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", **(pieces or {})}
    if not model_path.endswith(".model"):
        raise ValueError(f"{model_path}: a sentencepiece model path must end in .model")
    sentences = training_sentences(texts, max_chars)
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"{model_path}: no text to train the tokenizer on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_prepend(first, sentences), model_writer=buf,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=pieces["pad"], unk_piece=pieces["unk"], bos_piece=pieces["bos"],
            eos_piece=pieces["eos"], user_defined_symbols=list(special_tokens),
            character_coverage=character_coverage,
            input_sentence_size=0, max_sentence_length=4 * _MAX_SENTENCE_CHARS + 16,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"{model_path}: sentencepiece training failed: {e} (the vocabulary "
                         "size must fit the amount and variety of the training text)") from None
    tokenizer = Tokenizer(model_path, buf.getvalue())
    ids = {"vocab_size": tokenizer.vocab_size, "model_type": model_type,
           "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
           "byte_fallback": byte_fallback, "pieces": pieces,
           "special_tokens": {t: tokenizer.piece_to_id(t) for t in special_tokens}}
    # Sidecar first: a reader that sees the .model also finds its ids.
    cache.write_json_atomic(sidecar_path(model_path), ids)
    cache.write_bytes_atomic(model_path, buf.getvalue())
    return load_tokenizer(model_path)


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
