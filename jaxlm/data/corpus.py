"""The embedded default corpus: this Python's own standard library source, no download needed.

Every machine that runs jaxlm has the `.py` files under `sysconfig.get_paths()["stdlib"]`:
docstrings, comments and code, about 12 MB for CPython 3.11. Test folders, site-packages and
caches are left out. Each file is cut into documents at top-level `def`/`class`/decorator lines
(pieces shorter than `_MIN_DOC_CHARS` are joined to the next), which gives a few thousand
documents, so a shuffled batch mixes many modules instead of a few long files.

The split is by file, so held-out documents come from modules never seen in training: files are
ordered by the SHA-1 of their relative path and the first `eval_fraction` of them (at least one)
form the eval split. Documents are deduplicated (`jaxlm/data/dedup.py`, "near" by default: the
`encodings/` charmap tables and codec boilerplate repeat across dozens of files) in one pass
that reads the held-out files first, so a training document that copies a held-out one is
dropped from training and no near duplicate straddles the split. The corpus is written once
into the cache as two ArrayRecord files of UTF-8 documents plus `meta.json` (counts, the files
each split's documents come from, the dedup report), in a directory named by a hash of the
Python version, the file list with sizes, the split and the dedup settings, so a different
Python or setting never reuses a stale corpus.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
from collections.abc import Callable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxlm.data import cache
from jaxlm.data import dedup as dedup_lib

# Bump when the document cutting or the meta layout changes, so caches rebuild.
CORPUS_VERSION = 2
_MIN_DOC_CHARS = 400
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                            "__pycache__"})
_TOP_LEVEL = re.compile(r"^(def |class |async def |@)")
# Options of the corpus ArrayRecord files: one record per chunk, for cheap random access.
_WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class StdlibCorpus:
    """A built corpus: ArrayRecord files of UTF-8 documents per split, and its counts."""

    directory: str
    key: str
    num_documents: dict[str, int]
    num_chars: dict[str, int]
    # Per split, [relative path, documents] of each file in record order.
    files: dict[str, list[list]]
    dedup: dedup_lib.Report

    def path(self, split: str) -> str:
        return os.path.join(self.directory, f"{split}.array_record")

    def file_of(self, split: str) -> Callable[[int], str]:
        """Record number of `split` -> the relative path of the file it was cut from."""
        names = [name for name, _ in self.files[split]]
        ends = np.cumsum([count for _, count in self.files[split]]).tolist()
        return lambda index: names[bisect.bisect_right(ends, int(index))]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
    """Sorted relative paths of the stdlib's `.py` files, without tests and installed packages."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _EXCLUDED_DIRS and not d.startswith("test"))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def split_documents(source: str, min_chars: int = _MIN_DOC_CHARS) -> list[str]:
    """Cuts one file at top-level definitions; pieces under `min_chars` join the next one.

    The pieces concatenate back to `source` exactly. Decorators stay with what they decorate.
    """
    docs: list[str] = []
    current: list[str] = []
    size = 0
    prev_decorator = False
    for line in source.splitlines(keepends=True):
        starts = bool(_TOP_LEVEL.match(line)) and not prev_decorator
        if starts and size >= min_chars:
            docs.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
        if line.strip():
            prev_decorator = line.startswith("@")
    if current:
        if docs and size < min_chars:
            docs[-1] += "".join(current)
        else:
            docs.append("".join(current))
    return [d for d in docs if d.strip()]


def _path_order(relpath: str) -> str:
    return hashlib.sha1(relpath.encode()).hexdigest()


def corpus_key(root: str, files: list[str], eval_fraction: float, max_documents: int,
               dedup: dedup_lib.Settings) -> str:
    sizes = [(f, os.path.getsize(os.path.join(root, f))) for f in files]
    return cache.content_key(CORPUS_VERSION, sys.version, root, sizes, eval_fraction,
                             max_documents, _MIN_DOC_CHARS, dedup.key())


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def split_files(files: list[str], eval_fraction: float) -> dict[str, list[str]]:
    """Train/eval file lists: the first `eval_fraction` (>= 1 file) in SHA-1 order are eval."""
    ordered = sorted(files, key=_path_order)
    num_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(ordered)))
    return {"eval": ordered[:num_eval], "train": ordered[num_eval:]}


def build_stdlib_corpus(cache_dir: str, *, eval_fraction: float = 0.02,
                        max_documents: int = 0, root: str | None = None,
                        dedup: dedup_lib.Settings | None = None) -> StdlibCorpus:
    """Returns the cached corpus, building it (a few seconds) on first use.

    `dedup` defaults to near-duplicate removal. `max_documents` caps the kept training
    documents (the eval split keeps its fraction of the cap); reading stops there.
    """
    root = root or stdlib_root()
    dedup = dedup or dedup_lib.Settings()
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library {root}; use "
                                "data.source=files with your own text instead")
    key = corpus_key(root, files, eval_fraction, max_documents, dedup)
    directory = os.path.join(cache_dir, f"stdlib-corpus-{key}")

    def build(tmp: str) -> None:
        caps = {"train": max_documents,
                "eval": max(1, math.ceil(max_documents * eval_fraction)) if max_documents else 0}
        fingerprint = dedup_lib.Fingerprinter()
        deduplicator = dedup_lib.Deduplicator(dedup) if dedup.enabled else None
        signatures: dict[str, list] = {"eval": [], "train": []}
        meta = {"root": root, "python": sys.version, "key": key, "num_documents": {},
                "num_chars": {}, "num_files": {}, "files": {}}
        split = split_files(files, eval_fraction)
        for name in ("eval", "train"):  # held-out files first: training copies of them go
            writer = ArrayRecordWriter(os.path.join(tmp, f"{name}.array_record"),
                                       _WRITER_OPTIONS)
            count = chars = 0
            file_docs = []
            for rel in split[name]:
                if caps[name] and count >= caps[name]:
                    break
                used = 0
                for k, doc in enumerate(split_documents(_read_text(os.path.join(root, rel)))):
                    if caps[name] and count >= caps[name]:
                        break
                    if deduplicator is not None:
                        fp = fingerprint(doc)
                        if not deduplicator.add(fp, f"{rel}#{k}"):
                            continue
                        if fp is not None:
                            signatures[name].append((fp.signature_P, f"{rel}#{k}"))
                    writer.write(doc.encode("utf-8"))
                    count += 1
                    used += 1
                    chars += len(doc)
                if used:
                    file_docs.append([rel, used])
            writer.close()
            meta["num_documents"][name] = count
            meta["num_chars"][name] = chars
            meta["num_files"][name] = len(file_docs)
            meta["files"][name] = file_docs
        if deduplicator is None:
            report = dedup_lib.Report(dedup.mode, dedup.threshold)
        else:
            report = deduplicator.report
            report.contamination = dedup_lib.find_contamination(
                signatures["eval"], signatures["train"], dedup.threshold)
        meta["dedup"] = report.to_json()
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    cache.build_dir_once(directory, build)
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    built = StdlibCorpus(directory=directory, key=key, num_documents=meta["num_documents"],
                         num_chars=meta["num_chars"], files=meta["files"],
                         dedup=dedup_lib.Report.from_json(meta["dedup"]))
    dedup_lib.log_once(f"{built.dedup.summary('the stdlib corpus')} ({directory})")
    return built
