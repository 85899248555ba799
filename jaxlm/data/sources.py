"""Random-access document sources: raw text/jsonl/parquet files, text corpora, token shards.

Each source has `len` and `__getitem__(i)`, so grain can shuffle globally and shard by process
and worker without reading what it skips. An item is the document's text (`str`), its token ids
(`np.ndarray`, from prepared shards) or `Skipped` for a malformed record when
`skip_bad_records` is on; otherwise a malformed record raises ValueError naming `file:line`.

Raw files are indexed when the source is built (byte offsets of jsonl lines and text
documents, cached on disk by file size and mtime; row-group sizes of parquet files) and read
with `os.pread`, so reader threads share no file position. Parquet rows are read a row group at
a time with a small per-process cache, so globally shuffled reads of large parquet files are
slow: prepare those into shards with jaxlm/tools/prepare_data.py. Open files and caches are per
process: they are dropped when grain pickles a source into its worker processes.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import io
import json
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxlm.data import cache
from jaxlm.data import config as config_lib
from jaxlm.data import shards as shards_lib
from jaxlm.run.errors import DataError

_INDEX_CHUNK_BYTES = 64 << 20
# Warnings about skipped records logged per source and process, before going quiet.
_MAX_SKIP_WARNINGS = 5


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A malformed record that was skipped (and is counted by the packer)."""

    where: str
    reason: str


def expand_globs(patterns: Sequence[str], key: str) -> list[str]:
    """Sorted files matching each glob; a pattern that matches nothing raises naming it."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p))
        if not matches:
            what = "does not exist" if not glob.has_magic(pattern) else "matches no file"
            raise FileNotFoundError(f"config key {key}: {pattern!r} {what}")
        paths.extend(m for m in matches if m not in paths)
    return paths


def file_kind(path: str) -> str:
    if path.endswith(config_lib.JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(config_lib.PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(config_lib.ARRAYRECORD_SUFFIXES):
        return "arrayrecord"
    return "text"


class _BadRecords:
    """Raises on a malformed record, or returns a `Skipped` and warns a few times."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.warned = 0

    def __call__(self, where: str, reason: str) -> Skipped:
        if not self.skip:
            raise DataError(f"{where}: {reason} (fix the record, or set "
                            "data.skip_bad_records=True to skip and count such records)",
                            path=where)
        if self.warned < _MAX_SKIP_WARNINGS:
            self.warned += 1
            logging.warning("skipping %s: %s%s", where, reason,
                            "" if self.warned < _MAX_SKIP_WARNINGS else " (further skips of "
                            "this source are only counted)")
        return Skipped(where, reason)


# Non-UTF-8 documents are judged against at least this many documents read.
_MIN_DOCS_FOR_TEXT_FRACTION = 100


class _TextDecoder:
    """UTF-8 decoding that counts documents which are not UTF-8 text (invalid bytes, or NUL
    bytes: a binary file), warns naming the file, and stops once they exceed `max_fraction`
    of the documents read (at least _MIN_DOCS_FOR_TEXT_FRACTION)."""

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.decoded = 0
        self.bad = 0
        self.warned: set[str] = set()

    def __call__(self, raw: bytes, path: str) -> str:
        self.decoded += 1
        try:
            text = raw.decode("utf-8")
            binary = "\x00" in text
        except UnicodeDecodeError:
            text, binary = raw.decode("utf-8", errors="replace"), False
        else:
            if not binary:
                return text
        self.bad += 1
        kind = "binary (NUL bytes)" if binary else "not valid UTF-8"
        if path not in self.warned and len(self.warned) < _MAX_SKIP_WARNINGS:
            self.warned.add(path)
            logging.warning("%s: a document is %s; decoded with replacement characters (%d of "
                            "%d documents read so far)", path, kind, self.bad, self.decoded)
        if self.bad > self.max_fraction * max(self.decoded, _MIN_DOCS_FOR_TEXT_FRACTION):
            raise DataError(f"{path}: {self.bad} of {self.decoded} documents read are not UTF-8 "
                            f"text (this one is {kind}), more than "
                            f"data.max_bad_text_fraction={self.max_fraction}; remove binary or "
                            "re-encode the files, or raise data.max_bad_text_fraction",
                            path=path)
        return text


def _line_starts(path: str) -> np.ndarray:
    """Byte offsets of the starts of the lines of a file, read in chunks."""
    starts = [np.zeros(1, np.int64)]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while chunk := f.read(_INDEX_CHUNK_BYTES):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base + 1
            starts.append(newlines.astype(np.int64))
            base += len(chunk)
    out = np.concatenate(starts)
    return out[out < size] if size else out[:0]


def _delimited_spans(path: str, delimiter: str) -> np.ndarray:
    """[start, end) byte spans of the documents of a text file; one span if no delimiter."""
    size = os.path.getsize(path)
    if not delimiter or size == 0:
        return np.array([[0, size]], np.int64)
    sep = delimiter.encode()
    spans = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 0
        while (hit := mm.find(sep, start)) >= 0:
            spans.append((start, hit))
            start = hit + len(sep)
        spans.append((start, size))
    return np.array(spans, np.int64)


def _cached_index(path: str, kind: str, delimiter: str, cache_dir: str) -> np.ndarray:
    """Line starts (jsonl) or document spans (text) of a file, cached on disk if `cache_dir`.

    Indexing reads the whole file, so a large corpus is indexed once, not at every iterator
    (eval builds one per evaluation).
    """
    def build() -> np.ndarray:
        return _line_starts(path) if kind == "jsonl" else _delimited_spans(path, delimiter)

    if not cache_dir:
        return build()
    st = os.stat(path)
    key = cache.content_key(os.path.abspath(path), st.st_size, st.st_mtime_ns, kind,
                            delimiter if kind == "text" else "")
    cached = os.path.join(cache_dir, "file-index", f"{os.path.basename(path)}-{key}.npy")
    if os.path.isfile(cached):
        return np.load(cached)
    index = build()
    buf = io.BytesIO()
    np.save(buf, index)
    cache.write_bytes_atomic(cached, buf.getvalue())
    return index


class RawFilesSource:
    """Documents of .txt, .jsonl and .parquet files, as text.

    A .txt file is one document, or several cut at `delimiter`; a .jsonl line is one document
    (its `text_field`); a parquet row is one document (its `text_field` column).
    """

    def __init__(self, paths: Sequence[str], *, text_field: str = "text", delimiter: str = "",
                 skip_bad_records: bool = False, index_cache_dir: str = "",
                 max_bad_text_fraction: float = 0.01):
        self.paths = list(paths)
        self._decode = _TextDecoder(max_bad_text_fraction)
        self.text_field = text_field
        self.delimiter = delimiter
        self._bad = _BadRecords(skip_bad_records)
        self._kinds = [file_kind(p) for p in self.paths]
        self._index: list[np.ndarray] = []
        counts = []
        for path, kind in zip(self.paths, self._kinds):
            if kind == "parquet":
                index = self._parquet_row_groups(path)
                count = int(index[-1])
            elif kind in ("jsonl", "text"):
                index = _cached_index(path, kind, delimiter, index_cache_dir)
                count = len(index)
            else:
                raise ValueError(f"{path}: ArrayRecord shards are read with "
                                 "data.source=arrayrecord, not as raw files")
            self._index.append(index)
            counts.append(count)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._init_process_state()

    def _parquet_row_groups(self, path: str) -> np.ndarray:
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"{path}: cannot be read as parquet ({e})") from None
        names = meta.schema.names
        if self.text_field not in names:
            raise ValueError(f"{path}: no column {self.text_field!r} (columns: {names}); set "
                             "data.text_field")
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def _init_process_state(self) -> None:
        self._fds: dict[int, int] = {}
        self._row_groups: dict[tuple[int, int], list[Any]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_fds", "_row_groups", "_lock"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def not_text(self) -> int:
        """Documents this process has read that were not UTF-8 text (binary, invalid bytes)."""
        return self._decode.bad

    def document_range(self, f: int) -> tuple[int, int]:
        """[start, stop) of the global indices of the documents of file number `f`."""
        return int(self._offsets[f]), int(self._offsets[f + 1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, document number within that file) of a global document index."""
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._offsets, index) - 1
        return f, index - int(self._offsets[f])

    def name(self, index: int) -> str:
        """`path#k`: document k (from 0) of its file, for reports."""
        f, k = self.locate(index)
        return f"{self.paths[f]}#{k}"

    def path_of(self, index: int) -> str:
        return self.paths[self.locate(index)[0]]

    def _pread(self, f: int, start: int, end: int) -> bytes:
        with self._lock:
            fd = self._fds.get(f)
            if fd is None:
                fd = self._fds[f] = os.open(self.paths[f], os.O_RDONLY)
        return os.pread(fd, end - start, start)

    def __getitem__(self, index: int) -> str | Skipped:
        f, k = self.locate(int(index))
        kind = self._kinds[f]
        if kind == "jsonl":
            return self._jsonl_document(f, k)
        if kind == "parquet":
            return self._parquet_document(f, k)
        start, end = self._index[f][k]
        return self._decode(self._pread(f, int(start), int(end)), self.paths[f])

    def _jsonl_document(self, f: int, k: int) -> str | Skipped:
        starts, path = self._index[f], self.paths[f]
        end = int(starts[k + 1]) if k + 1 < len(starts) else os.path.getsize(path)
        line = self._pread(f, int(starts[k]), end)
        where = f"{path}:{k + 1}"
        if not line.strip():
            return ""
        try:
            record = json.loads(line)
        except ValueError as e:
            return self._bad(where, f"invalid JSON ({e})")
        if not isinstance(record, dict) or self.text_field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            return self._bad(where, f"no field {self.text_field!r} (found {fields}); set "
                             "data.text_field")
        text = record[self.text_field]
        if not isinstance(text, str):
            return self._bad(where, f"field {self.text_field!r} is "
                             f"{type(text).__name__}, not a string")
        return text

    def _parquet_document(self, f: int, k: int) -> str | Skipped:
        import pyarrow.parquet as pq

        groups, path = self._index[f], self.paths[f]
        g = bisect.bisect_right(groups, k) - 1
        with self._lock:
            column = self._row_groups.get((f, g))
        if column is None:
            table = pq.ParquetFile(path).read_row_group(g, columns=[self.text_field])
            column = table.column(0).to_pylist()
            with self._lock:
                if len(self._row_groups) >= 4:  # a few decoded row groups per process
                    self._row_groups.pop(next(iter(self._row_groups)))
                self._row_groups[(f, g)] = column
        text = column[k - int(groups[g])]
        if not isinstance(text, str):
            return self._bad(f"{path}:row {k}", f"column {self.text_field!r} is "
                             f"{type(text).__name__}, not a string")
        return text


class SubsetSource:
    """The documents of `source` at `indices` (those kept by deduplication), in that order."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[int(index)])]


class TextRecordSource:
    """UTF-8 documents stored one per record in ArrayRecord files (the stdlib corpus)."""

    def __init__(self, paths: Sequence[str]):
        import grain

        self.paths = list(paths)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        return self._records[int(index)].decode("utf-8", errors="replace")


class TokenShardSource:
    """Token ids of the documents in shards written by python -m jaxlm.tools.prepare_data.

    Checks, before anything is read: each shard directory has a manifest listing the shard, the
    manifest's tokenizer is `tokenizer` (same SHA-256), and every shard opens with the number of
    records the manifest promises. An empty shard is an error, or skipped with a warning when
    `skip_bad_records` is on.
    """

    def __init__(self, paths: Sequence[str], tokenizer: Any, *, skip_bad_records: bool = False,
                 verify: bool = False):
        """`verify`: read every record of every shard first (data.verify_shards)."""
        import grain

        self.vocab_size = tokenizer.vocab_size
        self._bad = _BadRecords(skip_bad_records)
        self.skipped_shards: list[str] = []
        self.paths: list[str] = []
        counts: list[int] = []
        dtypes = set()
        manifests: dict[str, dict[str, Any]] = {}
        for path in paths:
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in manifests:
                manifests[directory] = _checked_manifest(directory, tokenizer)
            manifest = manifests[directory]
            entry = manifest["by_name"].get(os.path.basename(path))
            if entry is None:
                raise ValueError(f"shard {path} is not listed in "
                                 f"{shards_lib.manifest_path(directory)}; remove stray files or "
                                 "re-run python -m jaxlm.tools.prepare_data")
            records = shards_lib.count_records(path)
            if records != entry["documents"]:
                raise ValueError(f"shard {path} holds {records} documents but its manifest "
                                 f"says {entry['documents']}; the shard is truncated or stale, "
                                 "re-run python -m jaxlm.tools.prepare_data")
            if records == 0:
                if not skip_bad_records:
                    raise ValueError(f"shard {path} is empty (0 documents); remove it from "
                                     "data.paths or set data.skip_bad_records=True to skip it")
                logging.warning("skipping empty shard %s", path)
                self.skipped_shards.append(path)
                continue
            if verify:
                _, problems = shards_lib.verify_shard(path, manifest["dtype"], self.vocab_size)
                if problems:
                    raise DataError(f"data.verify_shards: {len(problems)}+ bad records, first "
                                    f"{problems[0]}; re-run python -m jaxlm.tools.prepare_data "
                                    "(or set "
                                    "data.skip_bad_records=True and data.verify_shards=False to "
                                    "skip and count them)", path=path)
            self.paths.append(path)
            counts.append(records)
            dtypes.add(manifest["dtype"])
        if not self.paths:
            raise ValueError(f"no documents in the shards {list(paths)}")
        if len(dtypes) > 1:
            raise ValueError(f"shards {self.paths} mix token dtypes {dtypes}")
        self.dtype = dtypes.pop()
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def where(self, index: int) -> str:
        f = bisect.bisect_right(self._offsets, index) - 1
        return f"{self.paths[f]}:record {index - int(self._offsets[f])}"

    def path_of(self, index: int) -> str:
        return self.paths[bisect.bisect_right(self._offsets, index) - 1]

    def __getitem__(self, index: int) -> np.ndarray | Skipped:
        try:
            record = self._records[int(index)]
        except RuntimeError as e:  # a corrupted chunk: name the shard and record
            return self._bad(self.where(int(index)), f"unreadable ({' '.join(str(e).split())}); "
                             "find every bad record with python -m "
                             "jaxlm.tools.prepare_data --verify_only or "
                             "data.verify_shards=True")
        if len(record) % self.dtype.itemsize:
            return self._bad(self.where(int(index)), f"{len(record)} bytes is not a whole number "
                             f"of {self.dtype.name} token ids")
        tokens = shards_lib.decode_record(record, self.dtype)
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            return self._bad(self.where(int(index)), f"token id {int(tokens.max())} is outside "
                             f"the tokenizer's vocabulary of {self.vocab_size}")
        return tokens


def sample_texts(source: Any, max_chars: int) -> Iterator[str]:
    """About `max_chars` characters of texts of `source`, in order within each file.

    For raw files each file gets an equal share, so a glob of many files is sampled evenly;
    malformed records and empty documents are left out.
    """
    if isinstance(source, RawFilesSource):
        ranges = [source.document_range(f) for f in range(len(source.paths))]
    else:
        ranges = [(0, len(source))]
    budget = max_chars // max(len(ranges), 1) + 1
    for start, stop in ranges:
        used = 0
        for i in range(start, stop):
            if used >= budget:
                break
            item = source[i]
            if isinstance(item, str) and item:
                used += len(item)
                yield item


def _checked_manifest(directory: str, tokenizer: Any) -> dict[str, Any]:
    manifest = shards_lib.read_manifest(directory)
    recorded = manifest["tokenizer"]
    if recorded["sha256"] != tokenizer.sha256:
        raise ValueError(
            f"{shards_lib.manifest_path(directory)}: shards were tokenized with "
            f"{recorded.get('path')} (vocab {recorded.get('vocab_size')}, sha256 "
            f"{recorded['sha256'][:12]}) but the run uses {tokenizer.path} (vocab "
            f"{tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]}); set "
            "data.tokenizer_path to the shards' tokenizer or re-run "
            "python -m jaxlm.tools.prepare_data")
    return manifest


def manifest_tokenizer_path(paths: Sequence[str]) -> str:
    """The tokenizer recorded in the manifest next to the first shard of `paths`."""
    directory = os.path.dirname(os.path.abspath(paths[0]))
    recorded = shards_lib.read_manifest(directory)["tokenizer"].get("path", "")
    if not recorded or not os.path.isfile(recorded):
        raise FileNotFoundError(
            f"config key data.tokenizer_path: empty, and the tokenizer {recorded!r} recorded in "
            f"{shards_lib.manifest_path(directory)} does not exist here; set "
            "data.tokenizer_path to the tokenizer the shards were prepared with")
    return recorded
