"""Tokenizing raw files into ArrayRecord shards once, with worker processes (prepare_data.py).

The documents of the inputs (indexed as in `sources.RawFilesSource`, in file order) are split
into `num_shards` contiguous ranges; each worker process tokenizes one range at a time and writes
its shard under a temporary name, renamed when complete. The manifest is written last, so a
directory with a manifest is complete. Documents keep their input order; the pipeline shuffles.

With `dedup` ("near" by default, see jaxlm/data/dedup.py) the documents are deduplicated first:
the worker processes fingerprint ranges of documents, this process keeps the first copy of each
in input order, and only kept documents are tokenized. The counts go into the manifest under
"dedup". The pipeline's eval holdout of shards is drawn from the kept documents.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlm.data import cache, shards, sources
from jaxlm.data import dedup as dedup_lib
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.run.errors import DataError
from jaxlm.weights import write

# Documents tokenized per sentencepiece call, and between progress counter updates.
_ENCODE_BATCH = 256
# Documents fingerprinted per task of the dedup pass.
_FINGERPRINT_CHUNK = 2048

# Set in each worker process by `_init_worker`.
_worker: dict[str, Any] = {}


def _init_worker(source: sources.RawFilesSource, tokenizer: Tokenizer, counters: Any) -> None:
    _worker.update(source=source, tokenizer=tokenizer, counters=counters)


def _fingerprints(task: tuple[int, int]) -> list[dedup_lib.Fingerprint | None]:
    """Fingerprints of documents [start, stop); None for a record that is not text."""
    start, stop = task
    source = _worker["source"]
    fingerprint = _worker.setdefault("fingerprinter", dedup_lib.Fingerprinter())
    out = []
    for i in range(start, stop):
        item = source[i]
        out.append(fingerprint(item) if isinstance(item, str) else None)
    return out


def _write_shard(task: tuple[int, int, np.ndarray, str]) -> dict[str, Any]:
    """Tokenizes the documents at `indices` into shard `index`; returns its manifest entry."""
    index, count, indices, output_dir = task
    source, tokenizer, counters = _worker["source"], _worker["tokenizer"], _worker["counters"]
    not_text_before = source.not_text
    name = shards.shard_name(index, count)
    tmp_path = os.path.join(output_dir, f".tmp-{name}")
    writer = shards.ShardWriter(tmp_path, shards.token_dtype(tokenizer.vocab_size))
    skipped = empty = 0
    stop = len(indices)
    for lo in range(0, stop, _ENCODE_BATCH):
        texts = []
        for i in indices[lo:lo + _ENCODE_BATCH].tolist():
            item = source[i]
            if isinstance(item, sources.Skipped):
                skipped += 1
            elif not item:
                empty += 1
            else:
                texts.append(item)
        batch_tokens = 0
        for ids in tokenizer.encode_batch(texts):
            if ids:
                writer.write(ids)
                batch_tokens += len(ids)
            else:
                empty += 1
        if counters is not None:
            with counters.get_lock():
                counters[0] += min(stop, lo + _ENCODE_BATCH) - lo
                counters[1] += batch_tokens
    entry = writer.close()
    os.replace(tmp_path, os.path.join(output_dir, name))
    return {**entry, "name": name, "skipped_records": skipped, "empty_documents": empty,
            "not_text_documents": source.not_text - not_text_before}


def prepare_shards(inputs: Sequence[str], output_dir: str, tokenizer_path: str, *,
                   text_field: str = "text", text_delimiter: str = "", num_shards: int = 0,
                   docs_per_shard: int = 100_000, num_workers: int = 0,
                   skip_bad_records: bool = False, overwrite: bool = False,
                   dedup: dedup_lib.Settings | None = None,
                   max_bad_text_fraction: float = 0.01,
                   progress: Callable[[str], None] = print,
                   progress_every_s: float = 10.0) -> dict[str, Any]:
    """Writes the shards and manifest of `inputs` (globs) into `output_dir`; returns the manifest.

    num_shards=0 picks ceil(kept documents / docs_per_shard), at least num_workers.
    num_workers=0 tokenizes in this process. `dedup` defaults to near-duplicate removal.
    `output_dir` is written through `jaxlm.weights.write.output_directory`: new or empty
    unless `overwrite`, never holding an input, and complete or absent. Inputs without a
    document of text, or with more than `max_bad_text_fraction` of their documents not UTF-8
    text (binary files), are refused.
    """
    dedup = dedup or dedup_lib.Settings()
    t0 = time.perf_counter()
    paths = sources.expand_globs(inputs, "--input")
    write.check_output(output_dir, (*paths, tokenizer_path), overwrite=overwrite,
                       flag="--output_dir")
    tokenizer = load_tokenizer(tokenizer_path)
    source = sources.RawFilesSource(paths, text_field=text_field, delimiter=text_delimiter,
                                    skip_bad_records=skip_bad_records,
                                    max_bad_text_fraction=max_bad_text_fraction)
    if len(source) == 0:
        raise DataError(f"the inputs {paths} hold no documents", path=paths[0])
    with write.output_directory(output_dir, (*paths, tokenizer_path), overwrite=overwrite,
                                flag="--output_dir") as directory:
        manifest = _prepare(source, paths, directory, tokenizer, text_field=text_field,
                            text_delimiter=text_delimiter, num_shards=num_shards,
                            docs_per_shard=docs_per_shard, num_workers=num_workers,
                            dedup=dedup, max_bad_text_fraction=max_bad_text_fraction,
                            progress=progress, progress_every_s=progress_every_s, t0=t0)
    seconds, num_tokens = manifest["seconds"], manifest["num_tokens"]
    progress(f"wrote {manifest['num_documents']:,} documents, {num_tokens:,} tokens in "
             f"{seconds:.1f}s ({num_tokens / max(seconds, 1e-9):,.0f} tokens/s); skipped "
             f"{manifest['skipped_records']} malformed records, {manifest['empty_documents']} "
             f"empty documents -> {output_dir}")
    return manifest


def _prepare(source: sources.RawFilesSource, paths: list[str], output_dir: str,
             tokenizer: Tokenizer, *, text_field: str, text_delimiter: str, num_shards: int,
             docs_per_shard: int, num_workers: int, dedup: dedup_lib.Settings,
             max_bad_text_fraction: float, progress: Callable[[str], None],
             progress_every_s: float, t0: float) -> dict[str, Any]:
    """The shards and manifest of `source` written into the (new, empty) `output_dir`."""
    total = len(source)
    report = dedup_lib.Report(dedup.mode, dedup.threshold)
    kept = np.arange(total, dtype=np.int64)
    if dedup.enabled:
        kept, report = _deduplicate(source, tokenizer, dedup, num_workers, progress, t0)
        progress(report.summary(f"{len(paths)} files"))
    n = len(kept)
    count = num_shards or max(num_workers, 1, -(-n // docs_per_shard))
    count = min(count, n)
    tasks = [(i, count, kept[n * i // count:n * (i + 1) // count], output_dir)
             for i in range(count)]
    progress(f"{n:,} documents in {len(paths)} files -> {count} shards with "
             f"{max(num_workers, 1)} process(es)")
    try:
        if num_workers == 0:
            _init_worker(source, tokenizer, None)
            entries = []
            for task in tasks:
                entries.append(_write_shard(task))
                _report(progress, entries, n, t0)
        else:
            entries = _run_pool(tasks, source, tokenizer, num_workers, n, t0, progress,
                                progress_every_s)
    except BaseException:
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-shard-"):
                os.remove(os.path.join(output_dir, name))
        raise
    entries.sort(key=lambda e: e["name"])
    _check_text(paths, entries, max_bad_text_fraction)
    seconds = time.perf_counter() - t0
    num_tokens = sum(e["tokens"] for e in entries)
    manifest = {
        "format": shards.FORMAT_VERSION,
        "dtype": shards.token_dtype(tokenizer.vocab_size).str,
        "num_documents": sum(e["documents"] for e in entries),
        "num_tokens": num_tokens,
        "skipped_records": sum(e.pop("skipped_records") for e in entries),
        "empty_documents": sum(e.pop("empty_documents") for e in entries),
        "tokenizer": {"path": os.path.abspath(tokenizer.path), "sha256": tokenizer.sha256,
                      "vocab_size": tokenizer.vocab_size},
        "shards": entries,
        "inputs": [os.path.abspath(p) for p in paths],
        "text_field": text_field,
        "text_delimiter": text_delimiter,
        "dedup": report.to_json(),
        "seconds": round(seconds, 3),
    }
    cache.write_json_atomic(shards.manifest_path(output_dir), manifest)
    return manifest


def _check_text(paths: list[str], entries: list[dict[str, Any]],
                max_bad_text_fraction: float) -> None:
    """Refuses shards without a document, or with more than `max_bad_text_fraction` of the
    documents read not UTF-8 text (the inputs were binary)."""
    written = sum(e["documents"] for e in entries)
    read = written + sum(e["empty_documents"] + e["skipped_records"] for e in entries)
    not_text = sum(e.pop("not_text_documents") for e in entries)
    if not_text > max_bad_text_fraction * read:
        raise DataError(f"{not_text} of the {read} documents of {paths} are not UTF-8 text "
                        "(binary, or another encoding), more than --max_bad_text_fraction="
                        f"{max_bad_text_fraction}; remove or re-encode those files",
                        path=paths[0])
    if written == 0:
        raise DataError(f"the inputs {paths} hold no document with text ({read} empty or "
                        "skipped); check --input, --text_field and --text_delimiter",
                        path=paths[0])


def _deduplicate(source: sources.RawFilesSource, tokenizer: Tokenizer,
                 settings: dedup_lib.Settings, num_workers: int,
                 progress: Callable[[str], None],
                 t0: float) -> tuple[np.ndarray, dedup_lib.Report]:
    """Indices of the documents kept by the greedy pass (in input order) and its report; the
    fingerprints come from `num_workers` processes (or this one), in order."""
    n = len(source)
    chunks = [(lo, min(n, lo + _FINGERPRINT_CHUNK)) for lo in range(0, n, _FINGERPRINT_CHUNK)]
    deduplicator = dedup_lib.Deduplicator(settings)
    kept: list[int] = []
    last = time.perf_counter()

    def consume(start: int, fingerprints: list[dedup_lib.Fingerprint | None]) -> None:
        nonlocal last
        for i, fp in enumerate(fingerprints, start):
            if deduplicator.add(fp, source.name(i)):
                kept.append(i)
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            progress(f"  dedup: {start + len(fingerprints):,}/{n:,} documents, "
                     f"{len(kept):,} kept, {last - t0:.1f}s")

    if num_workers == 0:
        _init_worker(source, tokenizer, None)
        for chunk in chunks:
            consume(chunk[0], _fingerprints(chunk))
    else:
        with mp.get_context("spawn").Pool(num_workers, initializer=_init_worker,
                                          initargs=(source, tokenizer, None)) as pool:
            for chunk, fingerprints in zip(chunks, pool.imap(_fingerprints, chunks)):
                consume(chunk[0], fingerprints)
    return np.asarray(kept, np.int64), deduplicator.report


def _report(progress: Callable[[str], None], entries: list[dict[str, Any]], n: int,
            t0: float) -> None:
    docs = sum(e["documents"] + e["skipped_records"] + e["empty_documents"] for e in entries)
    tokens = sum(e["tokens"] for e in entries)
    _progress_line(progress, docs, tokens, n, t0)


def _progress_line(progress: Callable[[str], None], docs: int, tokens: int, n: int,
                   t0: float) -> None:
    elapsed = time.perf_counter() - t0
    progress(f"  {docs:,}/{n:,} documents ({100 * docs / n:.0f}%), {tokens:,} tokens, "
             f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s, {elapsed:.1f}s")


def _run_pool(tasks: list[tuple], source: sources.RawFilesSource, tokenizer: Tokenizer,
              num_workers: int, n: int, t0: float, progress: Callable[[str], None],
              progress_every_s: float) -> list[dict[str, Any]]:
    # spawn: the parent may have started threads (JAX, grain), which fork would copy broken.
    ctx = mp.get_context("spawn")
    counters = ctx.Array("q", 2)
    with ctx.Pool(num_workers, initializer=_init_worker,
                  initargs=(source, tokenizer, counters)) as pool:
        pending = [pool.apply_async(_write_shard, (task,)) for task in tasks]
        entries = []
        while pending:
            pending[0].wait(progress_every_s)
            still = []
            for result in pending:
                if result.ready():
                    entries.append(result.get())  # re-raises a worker's error here
                else:
                    still.append(result)
            pending = still
            with counters.get_lock():
                docs, tokens = counters[0], counters[1]
            _progress_line(progress, docs, tokens, n, t0)
    return entries
