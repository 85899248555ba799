"""Deduplication of documents before the train/held-out split: exact and MinHash near duplicates.

Corpora repeat themselves: generated tables, vendored copies, boilerplate. A held-out document
with a near copy in training measures memory, not generalisation, and repeated documents weigh
more in training than the data meant. `data.dedup` picks what is removed:

  "off"    nothing.
  "exact"  documents whose normalised text (NFKC, case-folded, whitespace runs as one space)
           has the SHA-256 of an earlier document.
  "near"   also documents whose estimated Jaccard similarity with an earlier kept document is
           at least `data.dedup_threshold`, over shingles of 5 consecutive normalised words
           (text with few spaces, such as Chinese, uses 5 consecutive characters instead).

Near duplicates are found with MinHash signatures (128 permutations) and LSH banding from the
maintained `datasketch` library. Its bands are chosen for recall (about 95% of pairs at the
threshold become candidates, not the 40% of its balanced default); every candidate is then
checked against the threshold with the two signatures, so extra candidates cost time only.

The pass is greedy and deterministic: documents are read in the corpus's fixed order and a
document is removed when it matches one already kept, so the first copy wins. Permutations come
from a fixed seed, shingles are hashed with SHA-1 (not Python's per-process `hash`) and LSH
candidates are sorted, so every run and every process keeps the same documents; the pass runs
before documents are shared out between processes, so the process count plays no part.

The train/held-out split is made from the kept documents, so near duplicates cannot straddle
it. `find_contamination` then checks what remains: held-out documents whose signature still
near-matches a training document (none after "near" by construction; after "exact", the near
copies that survive). `Report` holds the counts: documents and characters seen, removed as
exact and as near duplicates, a few examples, and the contamination check; it is logged and
stored beside the prepared data (the corpus cache entry, the dedup cache entry of raw files,
the shard manifest).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

MODES = ("off", "exact", "near")
# Bump when normalisation, shingling or hashing change, so cached results are recomputed.
DEDUP_VERSION = 1
NUM_PERM = 128
SHINGLE_SIZE = 5
# Fixed seed of the MinHash permutations: the same signatures in every run and process.
MINHASH_SEED = 20_240_917
# LSH band choice weights (false positives, false negatives): candidates are verified, so
# recall is what matters.
_LSH_WEIGHTS = (0.05, 0.95)
# Text with fewer than one whitespace per this many characters is shingled by characters.
_CHARS_PER_WORD_LIMIT = 20
# Examples of removed and contaminated documents kept in a report.
_MAX_EXAMPLES = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    """What deduplication removes: `mode` in MODES; `threshold` is the Jaccard similarity at or
    above which two documents are near duplicates."""

    mode: str = "near"
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dedup mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"dedup threshold must lie in (0, 1], got {self.threshold}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def key(self) -> list[Any]:
        """Everything that changes the result, for cache keys."""
        if not self.enabled:
            return ["off"]
        return [self.mode, self.threshold, DEDUP_VERSION, NUM_PERM, SHINGLE_SIZE, MINHASH_SEED,
                _LSH_WEIGHTS]


def normalize(text: str) -> str:
    """NFKC, case-folded ("Straße" and "STRASSE" agree), whitespace runs as one space, no
    leading or trailing space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(normalized: str, size: int = SHINGLE_SIZE) -> list[bytes]:
    """The distinct `size`-word shingles of normalised text (`size`-character ones when the text
    has few spaces); a text shorter than one shingle is a single shingle."""
    units: Sequence[str] = normalized.split(" ")
    joiner = " "
    if len(units) * _CHARS_PER_WORD_LIMIT < len(normalized):
        units, joiner = normalized.replace(" ", ""), ""
    if len(units) <= size:
        return [joiner.join(units).encode()]
    return sorted({joiner.join(units[i:i + size]).encode()
                   for i in range(len(units) - size + 1)})


def _sha1_32(data: bytes) -> int:
    return struct.unpack("<I", hashlib.sha1(data).digest()[:4])[0]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What deduplication needs of one document: its normalised text's SHA-256, its MinHash
    signature (uint32[NUM_PERM]) and its length in characters."""

    digest: bytes
    signature_P: np.ndarray
    chars: int


class _MinHasher:
    """MinHash signatures with one fixed set of permutations, built once."""

    def __init__(self) -> None:
        from datasketch import MinHash

        self._minhash_cls = MinHash
        proto = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=_sha1_32,
                        scheme="affine32")
        self.permutations = proto.permutations

    def minhash(self, signature_P: np.ndarray | None = None, units: list[bytes] | None = None):
        m = self._minhash_cls(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=_sha1_32,
                              permutations=self.permutations, scheme="affine32",
                              hashvalues=signature_P)
        if units:
            m.update_batch(units)
        return m


def _lsh(threshold: float):
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=_LSH_WEIGHTS)


class Fingerprinter:
    """text -> Fingerprint. Picklable (worker processes build their own MinHash state)."""

    def __init__(self) -> None:
        self._hasher: _MinHasher | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_hasher": None}

    def __call__(self, text: str) -> Fingerprint | None:
        """None for a document with no text after normalisation (kept, never compared)."""
        norm = normalize(text)
        if not norm:
            return None
        if self._hasher is None:
            self._hasher = _MinHasher()
        signature_P = self._hasher.minhash(units=shingles(norm)).hashvalues
        return Fingerprint(hashlib.sha256(norm.encode()).digest(), signature_P, len(text))


def similarity(a_P: np.ndarray, b_P: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures: the fraction of equal slots."""
    return float(np.mean(a_P == b_P))


@dataclasses.dataclass
class Contamination:
    """Held-out documents with a training document at or above the threshold."""

    checked: int = 0
    documents: int = 0
    examples: list[list[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """Counts of one deduplication pass, and the contamination check of the split after it."""

    mode: str
    threshold: float
    documents: int = 0
    chars: int = 0
    exact_documents: int = 0
    exact_chars: int = 0
    near_documents: int = 0
    near_chars: int = 0
    # [removed, kept] document names, the first few of each kind.
    examples: list[list[str]] = dataclasses.field(default_factory=list)
    contamination: Contamination | None = None

    @property
    def removed_documents(self) -> int:
        return self.exact_documents + self.near_documents

    @property
    def removed_chars(self) -> int:
        return self.exact_chars + self.near_chars

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        d = dict(d)
        if d.get("contamination") is not None:
            d["contamination"] = Contamination(**d["contamination"])
        return cls(**d)

    def summary(self, what: str) -> str:
        """One log line: what was removed, and what the contamination check found."""
        if self.mode == "off":
            return f"dedup of {what}: off"
        pct = 100 * self.removed_chars / max(self.chars, 1)
        line = (f"dedup of {what} ({self.mode}, threshold {self.threshold}): removed "
                f"{self.removed_documents} of {self.documents} documents ({self.exact_documents} "
                f"exact, {self.near_documents} near), {self.removed_chars:,} of {self.chars:,} "
                f"characters ({pct:.1f}%)")
        if self.examples:
            line += "; e.g. " + ", ".join(f"{r} ~ {k}" for r, k in self.examples[:3])
        c = self.contamination
        if c is not None:
            line += (f"; {c.documents} of {c.checked} held-out documents near-match a training "
                     "document")
            if c.examples:
                line += " (" + ", ".join(f"{h} ~ {t}" for h, t in c.examples[:3]) + ")"
        return line


class Deduplicator:
    """The greedy pass: `add` each document in the corpus's order; it returns whether the
    document is kept (no earlier kept document is an exact or, for "near", a near copy)."""

    def __init__(self, settings: Settings):
        if not settings.enabled:
            raise ValueError("Deduplicator needs data.dedup 'exact' or 'near'")
        self.settings = settings
        self.report = Report(settings.mode, settings.threshold)
        self._digests: dict[bytes, str] = {}
        self._hasher = _MinHasher()
        self._lsh = _lsh(settings.threshold) if settings.mode == "near" else None
        self._kept: list[tuple[np.ndarray, str]] = []

    def add(self, fingerprint: Fingerprint | None, name: str) -> bool:
        if fingerprint is None:
            return True
        r = self.report
        r.documents += 1
        r.chars += fingerprint.chars
        first = self._digests.get(fingerprint.digest)
        if first is not None:
            r.exact_documents += 1
            r.exact_chars += fingerprint.chars
            self._example(name, first)
            return False
        if self._lsh is not None:
            m = self._hasher.minhash(fingerprint.signature_P)
            for key in sorted(self._lsh.query(m)):
                kept_P, kept_name = self._kept[key]
                if similarity(kept_P, fingerprint.signature_P) >= self.settings.threshold:
                    r.near_documents += 1
                    r.near_chars += fingerprint.chars
                    self._example(name, kept_name)
                    return False
            self._lsh.insert(len(self._kept), m, check_duplication=False)
        self._digests[fingerprint.digest] = name
        self._kept.append((fingerprint.signature_P, name))
        return True

    def _example(self, removed: str, kept: str) -> None:
        if len(self.report.examples) < _MAX_EXAMPLES:
            self.report.examples.append([removed, kept])


def find_contamination(held_out: Sequence[tuple[np.ndarray, str]],
                       train: Iterable[tuple[np.ndarray, str]],
                       threshold: float) -> Contamination:
    """Held-out documents (signature, name) whose signature matches a training document's at or
    above `threshold` (LSH candidates, each checked with the signatures)."""
    hasher = _MinHasher()
    lsh = _lsh(threshold)
    train_list = list(train)
    for i, (sig_P, _) in enumerate(train_list):
        lsh.insert(i, hasher.minhash(sig_P), check_duplication=False)
    found = Contamination(checked=len(held_out))
    for sig_P, name in held_out:
        for key in sorted(lsh.query(hasher.minhash(sig_P))):
            if similarity(train_list[key][0], sig_P) >= threshold:
                found.documents += 1
                if len(found.examples) < _MAX_EXAMPLES:
                    found.examples.append([name, train_list[key][1]])
                break
    return found


@dataclasses.dataclass
class Result:
    """Kept positions of each group of documents given to `deduplicate`, and the report."""

    kept: list[np.ndarray]
    report: Report
    # Per group and kept document (aligned with `kept`): its (signature, name) for
    # find_contamination, or None when it had no text.
    signatures: list[list[tuple[np.ndarray, str] | None]]


def deduplicate(groups: Sequence[Iterable[tuple[str, Any]]], settings: Settings) -> Result:
    """One greedy pass over groups of (name, document) in order (earlier groups win ties: give
    the held-out documents first to drop training copies of them). A document that is not a
    string (a malformed record, token ids) is kept and not compared."""
    fingerprint = Fingerprinter()
    dedup = Deduplicator(settings)
    kept, signatures = [], []
    for group in groups:
        positions: list[int] = []
        sigs: list[tuple[np.ndarray, str] | None] = []
        for i, (name, doc) in enumerate(group):
            fp = fingerprint(doc) if isinstance(doc, str) else None
            if dedup.add(fp, name):
                positions.append(i)
                sigs.append(None if fp is None else (fp.signature_P, name))
        kept.append(np.asarray(positions, np.int64))
        signatures.append(sigs)
    return Result(kept, dedup.report, signatures)


@functools.lru_cache(maxsize=256)
def log_once(line: str) -> None:
    """Logs a dedup summary once per process (iterators, and so sources, are rebuilt at every
    evaluation)."""
    logging.info("%s", line)
