"""The pretraining input pipeline: documents -> token ids -> packed rows -> batches, in grain.

For each source (each component of a mixture):

    documents (random access)
      -> dedup (data.dedup, jaxlm/data/dedup.py): exact and near duplicates removed, the first
         copy kept (held-out files are read first when they are separate files)
      -> eval holdout: a fixed permutation, independent of data.seed, puts eval_fraction of the
         kept documents in "eval" (stdlib holds out whole files instead; data.eval_paths
         replaces it)
      -> train: a global shuffle, reseeded every epoch from data.seed; eval: one fixed
         permutation (EVAL_ORDER_SEED), so any number of eval batches is a uniform sample of
         the held-out documents, the same at every evaluation
      -> repeat forever
      -> slice [process_index::process_count] of that global stream: each JAX process reads a
         disjoint slice and together they read every document once per epoch
      -> tokenize, add BOS/EOS (in data.read_threads threads)
      -> pack into rows of seq_len (jaxlm/data/packing.py)
    mixture: rows of the components interleaved by weight, deterministically (so the weights
      are fractions of rows, i.e. of tokens)
    -> batch [batch_size, seq_len]
    -> prefetch: data.num_workers grain worker processes (each reads its own slice of the
       documents and packs and batches them), or one background thread if num_workers=0.

The result is a grain DatasetIterator: `get_state()` returns a JSON-serialisable dict and
`set_state(state)` restores it, after which the next batch is the one an uninterrupted run
would have produced. A state restores only into the same data config and num_workers.
Eval iterators never use worker processes (the held-out set is small and rebuilt per eval);
`jaxlm/data/eval_sample.py` packs a fixed token budget of held-out documents instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from jaxlm.data import cache, corpus, sources
from jaxlm.data import config as config_lib
from jaxlm.data import dedup as dedup_lib
from jaxlm.data.packing import PackedRowsIterDataset
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from jaxlm.run.errors import ConfigError

SPLITS = ("train", "eval")
# Seed of the eval holdout permutation; fixed so that changing data.seed never moves held-out
# documents into training.
_HOLDOUT_SEED = 20_240_611
# Seed of the one fixed order in which held-out documents are read: a uniform sample of the
# whole split in any prefix, the same at every evaluation and independent of data.seed.
EVAL_ORDER_SEED = 20_250_101
# Bump when tokenizer training changes, so cached tokenizers are retrained.
_TOKENIZER_VERSION = 1
# Thread count of on-the-fly tokenizer training: fixed, since it changes the merges.
_TOKENIZER_THREADS = 1


@dataclasses.dataclass
class DocumentSet:
    """The documents of one source and split, with their weight in a mixture."""

    name: str
    weight: float
    docs: grain.MapDataset
    # Tokenizer-independent identity of the data, for cache keys.
    key: Any
    # The source read in file order to sample tokenizer training text (for raw files this
    # includes the held-out documents: reading them shuffled would be slow for parquet).
    text_source: Any = None
    # Index into `docs` -> the file that document comes from (to describe eval samples).
    file_of: Callable[[int], str] | None = None
    # What deduplication removed and what its contamination check found (None: no dedup ran,
    # e.g. prepared shards, whose manifest holds the report of python -m jaxlm.tools.prepare_data).
    dedup: dedup_lib.Report | None = None


class ToTokens(grain.transforms.Map):
    """Text -> token ids with BOS/EOS; token arrays get BOS/EOS; `Skipped` passes through.

    A document with no tokens stays empty (no BOS/EOS), so the packer can count and skip it.
    """

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self._tokenizer = tokenizer
        self._bos = [tokenizer.bos_id] if add_bos else []
        self._eos = [tokenizer.eos_id] if add_eos else []

    def map(self, item: Any) -> np.ndarray | sources.Skipped:
        if isinstance(item, sources.Skipped):
            return item
        if isinstance(item, str):
            ids = self._tokenizer.encode(item)
            return np.asarray(self._bos + ids + self._eos if ids else [], dtype=np.int32)
        if item.size == 0:
            return item
        return np.concatenate([np.asarray(self._bos, np.int32), item,
                               np.asarray(self._eos, np.int32)])


class TakeRows(grain.transforms.Map):
    """Keeps rows [start, start + size) of every array of a batch (this process's share)."""

    def __init__(self, start: int, size: int):
        self.start, self.size = start, size

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.start:self.start + self.size] for k, v in batch.items()}


def _cache_dir(data: ml_collections.ConfigDict, cache_dir: str) -> str:
    return data.cache_dir or cache_dir


def _files_key(paths: list[str]) -> list[Any]:
    return [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


def _num_eval(eval_fraction: float, n: int) -> int:
    return math.ceil(eval_fraction * n) if eval_fraction > 0 else 0


def _holdout(docs: grain.MapDataset, split: str, eval_fraction: float,
             what: str) -> grain.MapDataset:
    """`split`'s part of `docs` under the fixed holdout permutation."""
    n = len(docs)
    num_eval = _num_eval(eval_fraction, n)
    if split == "eval" and num_eval == 0:
        raise ConfigError(f"config key data.eval_fraction: is 0, so {what} has no eval "
                         "documents; set it > 0 or set data.eval_paths")
    if split == "train" and num_eval >= n:
        raise ConfigError(f"config key data.eval_fraction: holding out {num_eval} of the {n} "
                         f"documents of {what} leaves none for training; lower it or set "
                         "data.eval_paths")
    if num_eval == 0:
        return docs
    permuted = docs.shuffle(seed=_HOLDOUT_SEED)
    return permuted[:num_eval] if split == "eval" else permuted[num_eval:]


def _raw_source(paths: list[str], data: ml_collections.ConfigDict,
                cache_dir: str, **overrides: Any) -> sources.RawFilesSource:
    kwargs = dict(text_field=data.text_field, delimiter=config_lib.text_delimiter(data),
                  skip_bad_records=data.skip_bad_records, index_cache_dir=cache_dir,
                  max_bad_text_fraction=data.max_bad_text_fraction)
    return sources.RawFilesSource(paths, **{**kwargs, **overrides})


def _named_texts(source: sources.RawFilesSource) -> Iterator[tuple[str, Any]]:
    """(name, text) of every document in order; None for one that cannot be read as text (it
    is kept, and raises or is skipped when the pipeline reads it, as without dedup)."""
    for i in range(len(source)):
        try:
            item = source[i]
        except ValueError:
            item = None
        yield source.name(i), item


def _dedup_raw_files(paths: list[str], eval_paths: list[str], data: ml_collections.ConfigDict,
                     cache_dir: str,
                     what: str) -> tuple[dict[str, np.ndarray], dedup_lib.Report] | None:
    """Indices of the raw documents kept by data.dedup (None when off): {"all": ...} of `paths`,
    split afterwards by the holdout; or, with data.eval_paths, {"eval": ..., "train": ...}, the
    held-out files read first so training copies of them are dropped; and the report. One pass
    on first use, cached under `cache_dir` with the report (counts, contamination check)."""
    settings = config_lib.dedup_settings(data)
    if not settings.enabled:
        return None
    holdout = None if eval_paths else [data.eval_fraction, _HOLDOUT_SEED]
    key = cache.content_key("dedup", _files_key(paths), _files_key(eval_paths), data.text_field,
                            data.text_delimiter, settings.key(), holdout)
    directory = os.path.join(cache_dir, f"dedup-{key}")

    def build(tmp: str) -> None:
        # A private reader: the pass must neither raise on bad records nor count them.
        def read(p: list[str]) -> sources.RawFilesSource:
            return _raw_source(p, data, cache_dir, skip_bad_records=True,
                               max_bad_text_fraction=1.0)

        logging.info("deduplicating the documents of %s (data.dedup=%s); cached in %s", what,
                     settings.mode, directory)
        if eval_paths:
            result = dedup_lib.deduplicate([_named_texts(read(eval_paths)),
                                            _named_texts(read(paths))], settings)
            kept = {"eval": result.kept[0], "train": result.kept[1]}
            held, train = result.signatures
        else:
            result = dedup_lib.deduplicate([_named_texts(read(paths))], settings)
            kept = {"all": result.kept[0]}
            n = len(kept["all"])
            eval_positions = set(grain.MapDataset.range(n).shuffle(seed=_HOLDOUT_SEED)[
                :_num_eval(data.eval_fraction, n)])
            sigs = result.signatures[0]
            held = [s for i, s in enumerate(sigs) if i in eval_positions]
            train = [s for i, s in enumerate(sigs) if i not in eval_positions]
        result.report.contamination = dedup_lib.find_contamination(
            [s for s in held if s is not None], (s for s in train if s is not None),
            settings.threshold)
        for name, indices in kept.items():
            np.save(os.path.join(tmp, f"{name}.npy"), indices)
        cache.write_json_atomic(os.path.join(tmp, "report.json"), result.report.to_json())

    cache.build_dir_once(directory, build)
    with open(os.path.join(directory, "report.json")) as f:
        report = dedup_lib.Report.from_json(json.load(f))
    dedup_lib.log_once(f"{report.summary(what)} ({directory})")
    return {name: np.load(os.path.join(directory, f"{name}.npy"))
            for name in (("eval", "train") if eval_paths else ("all",))}, report


def _spec_documents(spec: str, name: str, weight: float, data: ml_collections.ConfigDict,
                    tokenizer: Tokenizer | None, split: str, cache_dir: str,
                    key: str, eval_spec: str = "") -> DocumentSet:
    """The documents of one spec ("stdlib" or globs) for `split`."""
    if spec == "stdlib":
        built = corpus.build_stdlib_corpus(cache_dir, eval_fraction=data.eval_fraction,
                                           max_documents=data.max_documents,
                                           dedup=config_lib.dedup_settings(data))
        if built.num_documents[split] == 0:
            raise ConfigError(f"config key data.eval_fraction: the stdlib corpus has no {split} "
                             "documents; raise data.eval_fraction or data.max_documents")
        source = sources.TextRecordSource([built.path(split)])
        return DocumentSet(name, weight, grain.MapDataset.source(source), ["stdlib", built.key],
                           source, file_of=built.file_of(split), dedup=built.dedup)
    use_eval_files = split == "eval" and eval_spec
    train_paths = sources.expand_globs(config_lib.split_list(spec), key)
    eval_paths = (sources.expand_globs(config_lib.split_list(eval_spec), "data.eval_paths")
                  if eval_spec else [])
    paths = eval_paths if use_eval_files else train_paths
    patterns = config_lib.split_list(eval_spec if use_eval_files else spec)
    kinds = {sources.file_kind(p) for p in paths}
    deduplicated = None
    if "arrayrecord" in kinds:
        if kinds != {"arrayrecord"}:
            raise ConfigError(f"config key {key}: {patterns} mixes ArrayRecord shards with raw "
                             "files; give them as separate mixture components")
        if tokenizer is None:
            raise ConfigError(f"config key {key}: token shards need the tokenizer they were "
                             "prepared with")
        source = sources.TokenShardSource(paths, tokenizer,
                                          skip_bad_records=data.skip_bad_records,
                                          verify=data.verify_shards)
    else:
        source = _raw_source(paths, data, cache_dir)
        if len(source):
            deduplicated = _dedup_raw_files(train_paths, eval_paths, data, cache_dir,
                                            f"{key}={spec!r}")
    if len(source) == 0:
        raise ConfigError(f"config key {key}: the files {paths} hold no documents")
    identity = ["files", _files_key(paths), data.text_field, data.text_delimiter]
    base: Any = source
    positions = grain.MapDataset.range(len(source))  # docs position -> source index
    report = None
    if deduplicated is not None:
        kept, report = deduplicated
        indices = kept["all"] if not eval_spec else kept[split]
        if len(indices) == 0:
            raise ConfigError(f"config key {key}: no {split} document of {paths} is left after "
                              f"data.dedup={data.dedup!r} (every one duplicates a held-out "
                              "document of data.eval_paths or another one); give other files, "
                              "or set data.dedup='off'")
        base = sources.SubsetSource(source, indices)
        positions = grain.MapDataset.source(indices)
    docs = grain.MapDataset.source(base)
    if not eval_spec:  # with data.eval_paths, every training file trains
        docs = _holdout(docs, split, data.eval_fraction, f"{key}={spec!r}")
        positions = _holdout(positions, split, data.eval_fraction, f"{key}={spec!r}")
        identity.append(data.eval_fraction)
    return DocumentSet(name, weight, docs, identity, source,
                       file_of=lambda i: source.path_of(int(positions[int(i)])), dedup=report)


def document_sets(data: ml_collections.ConfigDict, tokenizer: Tokenizer | None, split: str,
                  cache_dir: str) -> list[DocumentSet]:
    """The weighted document sets of `split` that data.source names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_dir = _cache_dir(data, cache_dir)
    if data.source == "mixture":
        return [_spec_documents(c.spec, c.name, c.weight, data, tokenizer, split, cache_dir,
                                f"data.mixture[{c.name}]")
                for c in config_lib.parse_mixture(data.mixture)]
    spec = "stdlib" if data.source == "stdlib" else data.paths
    return [_spec_documents(spec, data.source, 1.0, data, tokenizer, split, cache_dir,
                            "data.paths", eval_spec=data.eval_paths)]


def eval_order(n: int) -> grain.MapDataset:
    """Indices 0..n-1 in the one fixed order held-out documents are read in (EVAL_ORDER_SEED):
    by the eval iterator (`docs.shuffle(seed=EVAL_ORDER_SEED)` is this order), the eval sample
    and the built-in evals."""
    return grain.MapDataset.range(n).shuffle(seed=EVAL_ORDER_SEED)


def document_stream(docs: grain.MapDataset, *, split: str, shuffle: bool, seed: int,
                    process_index: int, process_count: int) -> grain.MapDataset:
    """The endless per-process stream of documents: shuffled per epoch (train) or in the one
    fixed eval order, repeated, sliced.

    Process p reads items p, p + process_count, ... of one global stream, so the processes
    together read each document exactly once per epoch.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if split == "train" and shuffle:
        docs = docs.shuffle(seed=seed)
    elif split == "eval":
        docs = docs.shuffle(seed=EVAL_ORDER_SEED)  # the order of eval_order
    return docs.repeat(None)[process_index::process_count]


def _component_seed(seed: int, name: str) -> int:
    # Per component, so that adding a component leaves the others' order unchanged.
    return (seed + int(cache.content_key(name)[:8], 16)) % 2**32


def _packed_rows(ds: DocumentSet, data: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                 split: str, process_index: int, process_count: int,
                 single: bool) -> grain.IterDataset:
    seed = data.seed if single else _component_seed(data.seed, ds.name)
    stream = document_stream(ds.docs, split=split, shuffle=data.shuffle, seed=seed,
                             process_index=process_index, process_count=process_count)
    tokens = stream.map(ToTokens(tokenizer, data.add_bos, data.add_eos))
    read = grain.ReadOptions(num_threads=data.read_threads,
                             prefetch_buffer_size=max(8, 4 * data.read_threads))
    rows = PackedRowsIterDataset(tokens.to_iter_dataset(read), seq_len=data.seq_len,
                                 pad_id=tokenizer.pad_id, max_empty_run=4 * len(ds.docs) + 16,
                                 name=f"{ds.name} ({split})")
    if split == "train" and data.shuffle and data.shuffle_rows > 0:
        # Disjoint windows, each reshuffled from the seed: resumable from the window's start.
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data.shuffle_rows,
                                                           seed=seed)
    return rows


def _check_special_ids(data: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
    if data.add_bos and tokenizer.bos_id < 0:
        raise ConfigError(f"config key data.add_bos: tokenizer {tokenizer.path} has no BOS "
                         "token; set data.add_bos=False")
    if data.add_eos and tokenizer.eos_id < 0:
        raise ConfigError(f"config key data.add_eos: tokenizer {tokenizer.path} has no EOS "
                         "token; set data.add_eos=False")


def make_pretrain_iterator(data: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                           split: str, batch_size: int, process_index: int = 0,
                           process_count: int = 1, cache_dir: str) -> grain.DatasetIterator:
    """An endless iterator of packed batches of `split`, for this JAX process.

    `batch_size` is per process. Each batch is a dict of [batch_size, data.seq_len] arrays:
    inputs, targets, segment_ids, positions (int32) and loss_mask (float32). Call `close()` on
    the iterator when done with it: that stops its worker processes and prefetch thread.
    """
    config_lib.check_data_config(data)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_special_ids(data, tokenizer)
    take_rows = None
    if data.process_sharding == "rows":
        # Every process packs the global stream; each keeps its own rows of a global batch.
        take_rows = TakeRows(start=process_index * batch_size, size=batch_size)
        batch_size, process_index, process_count = batch_size * process_count, 0, 1
    sets = document_sets(data, tokenizer, split, cache_dir)
    rows = {s.name: _packed_rows(s, data, tokenizer, split=split, process_index=process_index,
                                 process_count=process_count, single=len(sets) == 1)
            for s in sets}
    if len(sets) == 1:
        ds = next(iter(rows.values()))
    else:
        ds = grain.IterDataset.mix(rows, {s.name: s.weight for s in sets})
    ds = ds.batch(batch_size, drop_remainder=True)
    if take_rows is not None:
        ds = ds.map(take_rows)
    workers = data.num_workers if split == "train" else 0
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; tests/notebooks skip app.run
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, data.prefetch_buffer_size)))
    elif data.prefetch_buffer_size > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=data.prefetch_buffer_size)
    return iter(ds)


def load_or_train_tokenizer(data: ml_collections.ConfigDict, cache_dir: str) -> Tokenizer:
    """data.tokenizer_path if set; else the tokenizer cached for this corpus, trained on first use.

    Token shards (source=arrayrecord, or a mixture with shard components) bring their own
    tokenizer: the one recorded in their manifest. Otherwise the tokenizer is trained on the
    corpus text (the train split of stdlib; raw files sampled evenly per file, in file order),
    at most data.tokenizer_sample_chars characters shared by mixture weight, and cached as
    `<cache_dir>/tokenizer-<type><vocab>-<key>.model`, where the key hashes the corpus
    identity and every tokenizer setting.
    """
    config_lib.check_data_config(data)
    if data.tokenizer_path:
        return load_tokenizer(data.tokenizer_path)
    cache_dir = _cache_dir(data, cache_dir)
    specs = ([(c.spec, c.weight) for c in config_lib.parse_mixture(data.mixture)]
             if data.source == "mixture" else
             [("stdlib" if data.source == "stdlib" else data.paths, 1.0)])
    for spec, _ in specs:
        if spec != "stdlib":
            patterns = config_lib.split_list(spec)
            if all(p.endswith(config_lib.ARRAYRECORD_SUFFIXES) for p in patterns):
                return load_tokenizer(sources.manifest_tokenizer_path(
                    sources.expand_globs(patterns, "data.paths")))
    sets = document_sets(data, None, "train", cache_dir)
    total_weight = sum(s.weight for s in sets)
    special = config_lib.special_tokens(data)
    key = cache.content_key(_TOKENIZER_VERSION, [(s.key, s.weight) for s in sets],
                            data.vocab_size, data.tokenizer_model_type, special,
                            data.tokenizer_sample_chars, _TOKENIZER_THREADS)
    path = os.path.join(cache_dir, f"tokenizer-{data.tokenizer_model_type}{data.vocab_size}-"
                                   f"{key}.model")
    if os.path.isfile(path):
        return load_tokenizer(path)

    def texts() -> Iterator[str]:
        for s in sets:
            budget = int(data.tokenizer_sample_chars * s.weight / total_weight)
            yield from sources.sample_texts(s.text_source, budget)

    logging.info("training a %d-token %s tokenizer on %s into %s", data.vocab_size,
                 data.tokenizer_model_type, [s.name for s in sets], path)
    try:
        return train_sentencepiece(texts(), path, vocab_size=data.vocab_size,
                                   model_type=data.tokenizer_model_type, special_tokens=special,
                                   max_chars=data.tokenizer_sample_chars,
                                   num_threads=_TOKENIZER_THREADS)
    except ValueError as e:
        raise ConfigError(f"config key data.vocab_size: {e}") from None
