"""The on-disk format of prepared data: tokenized ArrayRecord shards plus a manifest.

A directory written by python -m jaxlm.tools.prepare_data holds `shard-XXXXX-of-YYYYY.array_record`
files,
one record per document (its token ids as little-endian uint16, or uint32 for vocabularies over
65536, without BOS/EOS so the pipeline can choose), and `manifest.json`:

    {"format": 1, "dtype": "uint16", "num_documents": ..., "num_tokens": ...,
     "tokenizer": {"path": ..., "sha256": ..., "vocab_size": ...},
     "shards": [{"name": "shard-00000-of-00004.array_record", "documents": ..., "tokens": ...}],
     "inputs": [...], "text_field": "text", "skipped_records": 0}

Readers check the tokenizer hash, so shards are never decoded with the wrong vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".array_record"
# One record per chunk: random access reads exactly one document.
_WRITER_OPTIONS = "group_size:1"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}{SUFFIX}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def decode_record(record: bytes, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(record, dtype=dtype).astype(np.int32)


class ShardWriter:
    """Writes one shard: one record of token ids per document, counting documents and tokens."""

    def __init__(self, path: str, dtype: np.dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self._writer = ArrayRecordWriter(path, _WRITER_OPTIONS)

    def write(self, token_ids: Any) -> None:
        arr = np.asarray(token_ids, dtype=self.dtype)
        self._writer.write(arr.tobytes())
        self.documents += 1
        self.tokens += int(arr.size)

    def close(self) -> dict[str, Any]:
        self._writer.close()
        return {"name": os.path.basename(self.path), "documents": self.documents,
                "tokens": self.tokens}


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a shard directory; raises naming the file if it is missing or broken."""
    path = manifest_path(directory)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: shards must come with the manifest "
                                "written by python -m jaxlm.tools.prepare_data")
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["dtype"] = np.dtype(manifest["dtype"])
        by_name = {s["name"]: s for s in manifest["shards"]}
        manifest["tokenizer"]["sha256"]  # noqa: B018  (presence check)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e})") from None
    manifest["by_name"] = by_name
    return manifest


def verify_shard(path: str, dtype: np.dtype, vocab_size: int | None = None,
                 max_errors: int = 10) -> tuple[int, list[str]]:
    """Reads every record (chunk) of one shard: (records read, problems found, each naming the
    record). The startup check reads only the footer; this finds corruption inside the file."""
    problems: list[str] = []
    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    except RuntimeError as e:
        return 0, [f"{path}: cannot be opened as ArrayRecord ({' '.join(str(e).split())})"]
    try:
        n = reader.num_records()
        for i in range(n):
            try:
                record = reader.read([i])[0]
            except RuntimeError as e:
                problems.append(f"{path}:record {i}: unreadable ({' '.join(str(e).split())})")
            else:
                if len(record) % np.dtype(dtype).itemsize:
                    problems.append(f"{path}:record {i}: {len(record)} bytes is not a whole "
                                    f"number of {np.dtype(dtype).name} token ids")
                elif vocab_size is not None and len(record):
                    top = int(np.frombuffer(record, dtype=dtype).max())
                    if top >= vocab_size:
                        problems.append(f"{path}:record {i}: token id {top} is outside the "
                                        f"vocabulary of {vocab_size}")
            if len(problems) >= max_errors:
                break
    finally:
        reader.close()
    return n, problems


def verify_directory(directory: str, vocab_size: int | None = None) -> list[str]:
    """verify_shard over every shard of a prepared directory (per the manifest): problems."""
    manifest = read_manifest(directory)
    problems: list[str] = []
    for entry in manifest["shards"]:
        path = os.path.join(directory, entry["name"])
        n, found = verify_shard(path, manifest["dtype"], vocab_size)
        if not found and n != entry["documents"]:
            found = [f"{path}: holds {n} records but the manifest says {entry['documents']}"]
        problems.extend(found)
    return problems


def count_records(path: str) -> int:
    """Records in one shard; raises ValueError naming the shard if it cannot be opened."""
    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
        try:
            return reader.num_records()
        finally:
            reader.close()
    except RuntimeError as e:
        raise ValueError(f"shard {path} cannot be read as ArrayRecord ({e}); re-run "
                         "python -m jaxlm.tools.prepare_data") from None
