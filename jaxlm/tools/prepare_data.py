"""Tokenizes raw text/jsonl/parquet files into ArrayRecord shards plus a manifest.

    python -m jaxlm.tools.prepare_data --input='/data/fineweb-edu/sample/10BT/*.parquet' \
        --text_field=text --tokenizer=/data/tok/fineweb32k.model \
        --output_dir=/data/fineweb-edu-tok --num_workers=8

then train with `--config.data.source=arrayrecord
--config.data.paths='/data/fineweb-edu-tok/*.array_record'`. Documents are first deduplicated
(--dedup=near by default: exact and MinHash near duplicates, the first copy kept; --dedup=off for
a corpus deduplicated upstream), the counts printed and stored in the manifest. Worker processes
tokenize contiguous ranges of documents, one shard each at a time; progress and throughput are
printed. The format is described in jaxlm/data/shards.py. --output_dir must be new or empty
(--overwrite replaces it) and may not hold an input; it appears only once complete, and inputs
with no text, or binary ones, are refused.
"""

import os

from absl import app, flags

from jaxlm.data import dedup
from jaxlm.data.config import split_list
from jaxlm.data.prepare import prepare_shards
from jaxlm.data.shards import verify_directory
from jaxlm.run import errors
from jaxlm.run.errors import DataError

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs of .txt/.jsonl/.parquet.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for shards and manifest.json.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Sentencepiece .model to tokenize with.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Text field of jsonl/parquet records.")
_TEXT_DELIMITER = flags.DEFINE_string(
    "text_delimiter", "", "Document separator inside .txt files ('' = one document per file; "
    "backslash-n is a newline), e.g. '<|endoftext|>' for TinyStories.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards to write; 0 = from docs_per_shard.")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 100_000, "Used when num_shards=0.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Tokenizer processes; 0 = this process.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False,
                              "Skip and count malformed records instead of failing on them.")
_DEDUP = flags.DEFINE_enum("dedup", "near", list(dedup.MODES),
                           "Remove duplicate documents before tokenizing (jaxlm/data/dedup.py).")
_DEDUP_THRESHOLD = flags.DEFINE_float("dedup_threshold", 0.8, "Jaccard similarity of near "
                                      "duplicates (with --dedup=near).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir (never one "
                               "holding an input).")
_MAX_BAD_TEXT = flags.DEFINE_float("max_bad_text_fraction", 0.01, "Refuse inputs of which more "
                                   "than this fraction of documents are not UTF-8 text.")
_VERIFY = flags.DEFINE_bool("verify", True, "Read back every record of the written shards.")
_VERIFY_ONLY = flags.DEFINE_bool("verify_only", False, "Only check every record of the shards "
                                 "in --output_dir (no --input/--tokenizer needed).")


def _verify(output_dir: str) -> None:
    problems = verify_directory(output_dir)
    if problems:
        raise DataError(f"{len(problems)}+ bad records in {output_dir}, first {problems[0]}; "
                        "re-run jaxlm/tools/prepare_data.py --overwrite", path=output_dir)
    print(f"verified every record of the shards in {output_dir}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _OUTPUT_DIR.value is None:
        raise errors.ConfigError("--output_dir is required")
    if _VERIFY_ONLY.value:
        _verify(_OUTPUT_DIR.value)
        return
    for flag in (_INPUT, _TOKENIZER):
        if flag.value is None:
            raise errors.ConfigError(f"--{flag.name} is required")
    prepare_shards(split_list(_INPUT.value), _OUTPUT_DIR.value, _TOKENIZER.value,
                   text_field=_TEXT_FIELD.value,
                   text_delimiter=_TEXT_DELIMITER.value.replace("\\n", "\n"),
                   num_shards=_NUM_SHARDS.value, docs_per_shard=_DOCS_PER_SHARD.value,
                   num_workers=_NUM_WORKERS.value, skip_bad_records=_SKIP_BAD.value,
                   overwrite=_OVERWRITE.value, max_bad_text_fraction=_MAX_BAD_TEXT.value,
                   dedup=dedup.Settings(_DEDUP.value, _DEDUP_THRESHOLD.value),
                   progress=lambda line: print(line, flush=True))
    if _VERIFY.value:
        _verify(_OUTPUT_DIR.value)


if __name__ == "__main__":
    app.run(lambda argv: errors.run_main(main, argv))
