"""Packing documents into fixed-length next-token rows, with a checkpointable iterator state.

The documents (token arrays, BOS/EOS already added) are concatenated into one stream S and cut
into rows of seq_len + 1 tokens that overlap by one: row r is S[r*L : r*L + L + 1] for
L = seq_len. Then inputs = row[:-1] and targets = row[1:], so every token after the first is a
target exactly once and no token is dropped. Within a row:

* segment_ids number the document pieces 1, 2, 3, ...; 0 marks padding. Attention must not
  cross segments.
* positions count from 0 at the start of each piece. A document that continues from the
  previous row restarts at position 0 in the new row (positions stay below seq_len, so learned
  position tables work; rows never attend to each other anyway).
* loss_mask is 1.0 where input and target belong to the same piece, 0.0 on padding and where
  the target is the first token of the next document.

A finite stream ends with one padded row holding the remainder (not produced by the repeating
pipeline, which never ends). Malformed records (`sources.Skipped`) and empty documents are
skipped and counted in the iterator state.

State: the parent's state just before the document the next row starts in, plus the offset of
that row's first token inside it. Restoring re-reads that one document, so the state stays
small however long documents are.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxlm.data.sources import Skipped
from jaxlm.run.errors import DataError

Row = dict[str, np.ndarray]
_COUNTERS = ("documents", "skipped_records", "empty_documents", "rows")


class PackedRowsIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into rows of `seq_len` (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
                 max_empty_run: int, name: str = "documents"):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._max_empty_run = max_empty_run
        self._name = name

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), seq_len=self._seq_len,
                                  pad_id=self._pad_id, max_empty_run=self._max_empty_run,
                                  name=self._name)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._seq_len})"


class PackedRowsIterator(grain.DatasetIterator):
    """Iterator of `PackedRowsIterDataset`."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int,
                 max_empty_run: int, name: str):
        super().__init__(parent)
        self._row_len = seq_len + 1
        self._pad_id = pad_id
        self._max_empty_run = max_empty_run
        self._name = name
        self._doc: np.ndarray | None = None
        self._doc_state = self._parent.get_state()
        self._offset = 0
        self._exhausted = False
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def _next_document(self) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The next non-empty document and the parent state before it; (None, _) at the end."""
        run = 0
        while True:
            state = self._parent.get_state()
            try:
                item = next(self._parent)
            except StopIteration:
                return None, state
            if isinstance(item, Skipped):
                self._counts["skipped_records"] += 1
            elif item.size == 0:
                self._counts["empty_documents"] += 1
            else:
                self._counts["documents"] += 1
                return item, state
            run += 1
            if run > self._max_empty_run:
                raise DataError(
                    f"{self._name}: {run} documents in a row had no tokens "
                    f"({self._counts['skipped_records']} malformed records skipped, "
                    f"{self._counts['empty_documents']} empty documents so far); every document "
                    "is empty or malformed, check the files and data.text_field")

    def __next__(self) -> Row:
        if self._exhausted:
            raise StopIteration
        if self._doc is None:
            self._doc, self._doc_state = self._next_document()
            self._offset = 0
            if self._doc is None:
                self._exhausted = True
                raise StopIteration
        pieces = []
        need = self._row_len
        doc, offset, doc_state = self._doc, self._offset, self._doc_state
        while True:
            piece = doc[offset:offset + need]
            pieces.append(piece)
            need -= len(piece)
            if need == 0:
                # The next row starts at this row's last token (rows overlap by one).
                self._doc, self._offset, self._doc_state = doc, offset + len(piece) - 1, doc_state
                break
            doc, doc_state = self._next_document()
            offset = 0
            if doc is None:
                self._exhausted = True
                if self._row_len - need <= 1:  # only the token the last row already predicted
                    raise StopIteration
                break
        self._counts["rows"] += 1
        return self._make_row(pieces)

    def _make_row(self, pieces: list[np.ndarray]) -> Row:
        lengths = np.array([len(p) for p in pieces])
        total = int(lengths.sum())
        tokens = np.full(self._row_len, self._pad_id, np.int32)
        tokens[:total] = np.concatenate(pieces)
        segments = np.zeros(self._row_len, np.int32)
        segments[:total] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.zeros(self._row_len, np.int32)
        positions[:total] = np.arange(total) - starts
        same = (segments[:-1] == segments[1:]) & (segments[1:] > 0)
        return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segments[:-1],
                "positions": positions[:-1], "loss_mask": same.astype(np.float32)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._doc_state, "offset": self._offset,
                "has_document": self._doc is not None, "exhausted": self._exhausted,
                **self._counts}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._exhausted = bool(state["exhausted"])
        self._counts = {k: int(state[k]) for k in _COUNTERS}
        self._doc, self._doc_state, self._offset = None, state["parent"], 0
        if state["has_document"] and not self._exhausted:
            self._doc, self._doc_state = self._next_document()
            self._counts = {k: int(state[k]) for k in _COUNTERS}  # that one was counted before
            self._offset = int(state["offset"])
            if self._doc is None or self._offset >= len(self._doc):
                raise ValueError(f"{self._name}: the iterator state does not match the data "
                                 "(its document is missing or shorter); was it saved with a "
                                 "different data config?")

    def __str__(self) -> str:
        return f"PackedRowsIterator(seq_len={self._row_len - 1})"


def pipeline_counters(state: Any) -> dict[str, int]:
    """Sums the packers' counters (documents, skipped_records, ...) over a whole iterator state.

    The state may nest packers of several mixture components and worker processes.
    """
    totals = dict.fromkeys(_COUNTERS, 0)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if all(k in node for k in _COUNTERS) and "has_document" in node:
                for k in _COUNTERS:
                    totals[k] += int(node[k])
                return
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(state)
    return totals

