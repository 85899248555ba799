"""The `data` section of a run config: its defaults, its checks, and its small string formats.

Every key is a plain string, number or bool so that `--config.data.key=value` overrides work.
Lists are comma-separated strings: `data.paths` holds file globs, `data.mixture` holds weighted
sources written `[name=]spec:weight`, where spec is `stdlib` or a file glob, e.g.

    --config.data.source=mixture
    --config.data.mixture="web=/d/fineweb/*.array_record:0.7,code=/d/code/*.jsonl:0.2,stdlib:0.1"

Importing this module pulls in neither grain nor JAX.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxlm.data import dedup as dedup_lib
from jaxlm.run import errors
from jaxlm.run.errors import ConfigError
from jaxlm.run.section import Section

SOURCES = ("stdlib", "files", "arrayrecord", "mixture")
PROCESS_SHARDING = ("documents", "rows")
MODEL_TYPES = ("bpe", "unigram")
# File name endings of each kind of input; anything else is read as plain text.
ARRAYRECORD_SUFFIXES = (".array_record", ".arrayrecord")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# Ids below 256 + 4 control tokens cannot hold the byte-fallback pieces.
MIN_VOCAB_SIZE = 300


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section with its defaults."""
    d = ml_collections.ConfigDict()
    # Where documents come from: "stdlib" (this Python's standard library, built into the cache
    # on first use, no download), "files" (raw .txt/.jsonl/.parquet tokenized on the fly),
    # "arrayrecord" (shards written by python -m jaxlm.tools.prepare_data) or "mixture"
    # (data.mixture).
    d.source = "stdlib"
    # Tokens per packed row; every batch array is [batch, seq_len].
    d.seq_len = 256
    # A sentencepiece .model; "" = train one on the corpus (cached under cache_dir). For
    # source=arrayrecord, "" = the tokenizer recorded in the shards' manifest.json.
    d.tokenizer_path = ""
    # Vocabulary of a tokenizer trained on the fly (ignored when tokenizer_path is set).
    # Sizes only that trained tokenizer; the model takes model.vocab_size (0: the tokenizer's).
    d.vocab_size = 8192
    # Sentencepiece algorithm of a tokenizer trained on the fly: "bpe" or "unigram".
    d.tokenizer_model_type = "bpe"
    # Extra special tokens (comma-separated) of a tokenizer trained on the fly, e.g. chat
    # markers (the chat template's, see jaxlm/data/chat.py); each becomes one id.
    # BOS/EOS/PAD/UNK always exist.
    d.special_tokens = "<|im_start|>,<|im_end|>"
    # At most this many characters of training documents feed a tokenizer trained on the fly.
    d.tokenizer_sample_chars = 20_000_000
    # Corpus and tokenizer cache; "" = <workdir>/cache.
    d.cache_dir = ""
    # Comma-separated file globs of source=files or source=arrayrecord.
    d.paths = ""
    # Comma-separated globs of held-out files; "" = hold out data.eval_fraction of the documents.
    d.eval_paths = ""
    # Weighted sources of source=mixture: "[name=]spec:weight,...", spec = stdlib or a glob.
    d.mixture = ""
    # Field holding the document text in .jsonl and .parquet files.
    d.text_field = "text"
    # Separator of documents inside .txt files; "" = one document per file. "\n" and "\n\n"
    # may be written as the two characters backslash-n.
    d.text_delimiter = ""
    # Fraction of documents held out for the eval split (by file for stdlib, by a fixed
    # permutation independent of data.seed otherwise).
    d.eval_fraction = 0.02
    # Cap on the documents of the stdlib corpus (train split; eval keeps its fraction); 0 = all.
    d.max_documents = 0
    # Deduplication of text documents before the train/eval split (jaxlm/data/dedup.py):
    # "off", "exact" (same normalised text) or "near" (also MinHash near duplicates). Applies to
    # the stdlib corpus and raw files (one pass over the corpus on first use, cached under
    # cache_dir); prepared shards are deduplicated by python -m jaxlm.tools.prepare_data --dedup.
    d.dedup = "near"
    # Estimated Jaccard similarity of 5-word shingles at which two documents are near duplicates.
    d.dedup_threshold = 0.8
    # Seed of the global document shuffle; each epoch is reshuffled from it.
    d.seed = 0
    # Shuffle training documents globally (held-out documents are always read in one fixed
    # random order).
    d.shuffle = True
    # Shuffle packed training rows within windows of this many rows (0 = off). Packing cuts a
    # long document into consecutive rows; without this, one long file fills whole batches.
    d.shuffle_rows = 1024
    # Start every document with BOS / end it with EOS.
    d.add_bos = True
    d.add_eos = True
    # How JAX processes split the data: "documents" (each process reads and packs its own
    # disjoint slice of the documents; scales to any number of hosts, but the global batch
    # depends on the process count) or "rows" (every process packs the one global stream and
    # keeps its rows of each global batch: batches, losses and the saved data position are
    # the same for any number of processes, at the cost of each process tokenizing everything).
    d.process_sharding = "documents"
    # Grain worker processes that read, tokenize, pack and batch (0 = in the main process).
    d.num_workers = 0
    # Batches buffered ahead: per worker process, or by a background thread if num_workers=0.
    d.prefetch_buffer_size = 4
    # Threads reading and tokenizing documents inside each process (0 = in the iterating thread).
    d.read_threads = 2
    # Skip (and count) malformed records such as a jsonl line without data.text_field, instead
    # of raising an error that names the file and line.
    d.skip_bad_records = False
    # Read every record of every ArrayRecord shard at start-up (the default check reads only
    # each shard's footer); a bad record is then reported before training starts.
    d.verify_shards = False
    # Raw text documents that are not UTF-8 (or are binary) are decoded with replacement
    # characters, counted and warned about; above this fraction of the documents read the run
    # stops naming the file.
    d.max_bad_text_fraction = 0.01
    return d


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """One weighted source of a mixture: `spec` is "stdlib" or a file glob."""

    name: str
    spec: str
    weight: float


def use_files(data: ml_collections.ConfigDict, paths: str, tokenizer_path: str = "") -> None:
    """Points `data` at comma-separated globs: ArrayRecord shards (`jaxlm.tools.prepare_data`) or
    raw .txt/.jsonl/.parquet files by their suffix; "" keeps the current source. The `data=` and
    `tokenizer=` arguments of the shipped configs go through here."""
    if tokenizer_path:
        data.tokenizer_path = tokenizer_path
    if paths:
        patterns = split_list(paths)
        data.source = ("arrayrecord" if all(p.endswith(ARRAYRECORD_SUFFIXES) for p in patterns)
                       else "files")
        data.paths = paths


def split_list(value: str) -> list[str]:
    """The non-empty items of a comma-separated config string."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_mixture(value: str, key: str = "data.mixture") -> list[MixtureComponent]:
    """Parses "[name=]spec:weight,..."; raises ValueError naming `key` on a malformed item."""
    components = []
    for i, item in enumerate(split_list(value)):
        name, eq, rest = item.partition("=")
        if not eq or "/" in name or "*" in name:
            name, rest = "", item
        spec, colon, weight_str = rest.rpartition(":")
        name = name.strip() or ("stdlib" if spec.strip() == "stdlib" else f"source{i}")
        if not colon or not spec:
            raise ConfigError(f"config key {key}: item {item!r} must read [name=]spec:weight, "
                             "e.g. web=/data/web/*.jsonl:0.7")
        try:
            weight = float(weight_str)
        except ValueError:
            raise ConfigError(f"config key {key}: weight {weight_str!r} of item {item!r} is not "
                             "a number") from None
        if not weight > 0:
            raise ConfigError(f"config key {key}: weight of item {item!r} must be positive, got "
                             f"{weight}")
        components.append(MixtureComponent(name=name.strip(), spec=spec.strip(), weight=weight))
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key {key}: component names {names} are not unique")
    return components


def text_delimiter(data: ml_collections.ConfigDict) -> str:
    """data.text_delimiter with backslash-n written out as a newline."""
    return data.text_delimiter.replace("\\n", "\n")


def dedup_settings(data: ml_collections.ConfigDict) -> dedup_lib.Settings:
    """data.dedup and data.dedup_threshold as dedup settings."""
    return dedup_lib.Settings(data.dedup, float(data.dedup_threshold))


def special_tokens(data: ml_collections.ConfigDict) -> list[str]:
    return split_list(data.special_tokens)


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(f"data.{key}", msg)


def check_data_config(data: ml_collections.ConfigDict) -> None:
    """Raises ValueError("config key data.<key>: ...") on a bad value, before anything runs.

    File existence is checked when the pipeline is built; that error names the file or glob.
    """
    errors.check_choice("data.source", data.source, SOURCES)
    if data.seq_len <= 0:
        _fail("seq_len", f"must be positive, got {data.seq_len}")
    errors.check_interval("data.max_bad_text_fraction", data.max_bad_text_fraction, 0, 1)
    if not data.tokenizer_path:
        if data.vocab_size < MIN_VOCAB_SIZE:
            _fail("vocab_size", f"{data.vocab_size} is too small for a byte-fallback tokenizer; "
                  f"use at least {MIN_VOCAB_SIZE}")
        errors.check_choice("data.tokenizer_model_type", data.tokenizer_model_type, MODEL_TYPES)
        if data.tokenizer_sample_chars <= 0:
            _fail("tokenizer_sample_chars", f"must be positive, got {data.tokenizer_sample_chars}")
    if data.source in ("files", "arrayrecord") and not split_list(data.paths):
        _fail("paths", f"is empty but data.source={data.source!r} reads files; set it to "
              "comma-separated globs, e.g. /data/train-*.jsonl")
    if data.source == "arrayrecord":
        for pattern in split_list(data.paths) + split_list(data.eval_paths):
            if not pattern.endswith(ARRAYRECORD_SUFFIXES):
                _fail("paths" if pattern in data.paths else "eval_paths",
                      f"{pattern!r} does not end in {ARRAYRECORD_SUFFIXES}; source=arrayrecord "
                      "reads shards written by python -m jaxlm.tools.prepare_data")
    if data.source == "mixture":
        components = parse_mixture(data.mixture)
        if not components:
            _fail("mixture", "is empty but data.source='mixture'; set it to "
                  "'[name=]spec:weight,...', e.g. 'web=/d/web/*.jsonl:0.7,stdlib:0.3'")
    elif data.mixture:
        parse_mixture(data.mixture)
    errors.check_interval("data.eval_fraction", data.eval_fraction, 0, 1, "[)")
    errors.check_choice("data.dedup", data.dedup, dedup_lib.MODES)
    errors.check_interval("data.dedup_threshold", data.dedup_threshold, 0, 1, "(]")
    if data.max_documents < 0:
        _fail("max_documents", f"must be >= 0 (0 = all), got {data.max_documents}")
    if not 0 <= data.seed < 2**32:
        _fail("seed", f"must lie in [0, 2**32), got {data.seed}")
    errors.check_at_least("data.shuffle_rows", data.shuffle_rows, 0)
    errors.check_choice("data.process_sharding", data.process_sharding, PROCESS_SHARDING)
    for key in ("num_workers", "prefetch_buffer_size", "read_threads"):
        errors.check_at_least(f"data.{key}", data[key], 0)
    if not data.text_field:
        _fail("text_field", "must name the field that holds the text, e.g. 'text'")


def check_data(config: ml_collections.ConfigDict) -> None:
    check_data_config(config.data)


DATA = Section("data", default_data_config, check_data)
