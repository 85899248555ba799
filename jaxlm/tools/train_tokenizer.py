"""Trains a lossless sentencepiece tokenizer from .txt/.jsonl/.parquet files.

    python -m jaxlm.tools.train_tokenizer --input='/data/tinystories/*.txt' \
        --text_delimiter='<|endoftext|>' --vocab_size=8192 --output=/data/tok/ts8k.model \
        --special_tokens='<|system|>,<|user|>,<|assistant|>,<|end|>'

writes ts8k.model and ts8k.json (the special-token ids). Ids 0-3 are PAD, UNK, BOS, EOS (their
pieces can be renamed with --pad_piece etc.); --special_tokens become single ids after them.
Text is sampled evenly over the input files, up to --max_chars characters.
"""

import os

from absl import app, flags

from jaxlm.data import sources
from jaxlm.data.config import split_list
from jaxlm.data.tokenizer import train_sentencepiece
from jaxlm.run import errors

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs of .txt/.jsonl/.parquet.")
_OUTPUT = flags.DEFINE_string("output", None, "Path of the .model to write.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Text field of jsonl/parquet records.")
_TEXT_DELIMITER = flags.DEFINE_string(
    "text_delimiter", "", "Document separator inside .txt files ('' = one document per file).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size, special ids included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "Algorithm.")
_BYTE_FALLBACK = flags.DEFINE_bool("byte_fallback", True,
                                   "Encode unseen characters as UTF-8 byte tokens (lossless).")
_SPECIAL = flags.DEFINE_string("special_tokens", "",
                               "Comma-separated extra special tokens, e.g. chat markers.")
_PAD = flags.DEFINE_string("pad_piece", "<pad>", "Piece of id 0.")
_UNK = flags.DEFINE_string("unk_piece", "<unk>", "Piece of id 1.")
_BOS = flags.DEFINE_string("bos_piece", "<s>", "Piece of id 2 (BOS).")
_EOS = flags.DEFINE_string("eos_piece", "</s>", "Piece of id 3 (EOS).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 50_000_000, "Characters of training text.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", os.cpu_count() or 1,
                                    "Trainer threads (the result depends on this number).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "Skip malformed records.")
flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = sources.expand_globs(split_list(_INPUT.value), "--input")
    source = sources.RawFilesSource(paths, text_field=_TEXT_FIELD.value,
                                    delimiter=_TEXT_DELIMITER.value.replace("\\n", "\n"),
                                    skip_bad_records=_SKIP_BAD.value)
    tokenizer = train_sentencepiece(
        sources.sample_texts(source, _MAX_CHARS.value), _OUTPUT.value, vocab_size=_VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value, special_tokens=split_list(_SPECIAL.value),
        byte_fallback=_BYTE_FALLBACK.value, max_chars=_MAX_CHARS.value,
        num_threads=_NUM_THREADS.value,
        pieces={"pad": _PAD.value, "unk": _UNK.value, "bos": _BOS.value, "eos": _EOS.value})
    print(f"wrote {tokenizer.path} ({tokenizer.vocab_size} ids) and its .json sidecar; "
          f"special tokens {tokenizer.special_tokens}")


if __name__ == "__main__":
    app.run(lambda argv: errors.run_main(main, argv))
