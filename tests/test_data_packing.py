"""Packing: no token lost, correct segment ids/positions/loss mask, resumable state."""

import grain
import numpy as np
import pytest

from jaxlm.data.packing import PackedRowsIterDataset, pipeline_counters
from jaxlm.data.sources import Skipped

SEQ_LEN = 8


def _documents(seed: int = 0, num_docs: int = 40) -> list[np.ndarray]:
    """Token arrays with lengths from 1 to several rows; token values encode (doc, index)."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 3, 5, 8, 9, 13, 30], size=num_docs)
    return [(1000 * (d + 1) + np.arange(n)).astype(np.int32) for d, n in enumerate(lengths)]


def _pack(items, seq_len=SEQ_LEN, max_empty_run=1000):
    ds = grain.MapDataset.source(items).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackedRowsIterDataset(ds, seq_len=seq_len, pad_id=0, max_empty_run=max_empty_run)


def test_rows_cover_the_stream_exactly_once():
    docs = _documents()
    rows = list(_pack(docs))
    stream = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    start_of = np.concatenate([np.full(len(d), sum(map(len, docs[:i]))) for i, d in
                               enumerate(docs)])
    targets = []
    for r, row in enumerate(rows):
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
            assert row[k].shape == (SEQ_LEN,)
        lo = r * SEQ_LEN
        real = row["segment_ids"] > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end"
        np.testing.assert_array_equal(row["inputs"][:n], stream[lo:lo + n])
        # Segments number the documents of the row 1, 2, ... in order.
        docs_in_row = doc_of[lo:lo + n]
        expected_seg = np.searchsorted(np.unique(docs_in_row), docs_in_row) + 1
        np.testing.assert_array_equal(row["segment_ids"][:n], expected_seg)
        # Positions restart at each document start, and at the row start.
        expected_pos = np.arange(lo, lo + n) - np.maximum(start_of[lo:lo + n], lo)
        np.testing.assert_array_equal(row["positions"][:n], expected_pos)
        # A target counts only if it is the next token of the same document.
        has_target = np.arange(lo, lo + SEQ_LEN) + 1 < len(stream)
        same_doc = np.zeros(SEQ_LEN, bool)
        idx = np.arange(lo, lo + SEQ_LEN)[has_target]
        same_doc[has_target] = doc_of[idx] == doc_of[idx + 1]
        np.testing.assert_array_equal(row["loss_mask"], same_doc.astype(np.float32))
        targets.extend(row["targets"][: int(has_target.sum())])
        np.testing.assert_array_equal(row["positions"][~real], 0)
    # Every token but the first is a target exactly once: nothing dropped, nothing repeated.
    np.testing.assert_array_equal(np.array(targets), stream[1:])
    assert len(rows) == -(-(len(stream) - 1) // SEQ_LEN)


def test_long_document_spans_rows_with_positions_restarting():
    rows = list(_pack([np.arange(1, 21, dtype=np.int32)]))
    assert len(rows) == 3
    np.testing.assert_array_equal(rows[0]["inputs"], np.arange(1, 9))
    np.testing.assert_array_equal(rows[1]["inputs"], np.arange(9, 17))
    np.testing.assert_array_equal(rows[1]["positions"], np.arange(8))
    np.testing.assert_array_equal(rows[2]["inputs"][:4], [17, 18, 19, 20])
    np.testing.assert_array_equal(rows[2]["loss_mask"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_skipped_and_empty_documents_are_counted():
    items = [np.arange(1, 6, dtype=np.int32), Skipped("f.jsonl:2", "no field"),
             np.zeros(0, np.int32), np.arange(6, 12, dtype=np.int32)]
    it = iter(_pack(items))
    rows = list(it)
    np.testing.assert_array_equal(rows[0]["inputs"], [1, 2, 3, 4, 5, 6, 7, 8])
    counts = pipeline_counters(it.get_state())
    assert counts["skipped_records"] == 1 and counts["empty_documents"] == 1
    assert counts["documents"] == 2 and counts["rows"] == 2


def test_only_empty_documents_raise_instead_of_hanging():
    ds = grain.MapDataset.source([np.zeros(0, np.int32), Skipped("x:1", "bad")]).repeat(None)
    packed = PackedRowsIterDataset(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)),
                                   seq_len=SEQ_LEN, pad_id=0, max_empty_run=10, name="corpus")
    with pytest.raises(ValueError, match="corpus: 11 documents in a row had no tokens"):
        next(iter(packed))


def test_state_restores_at_every_row():
    docs = _documents(seed=1, num_docs=12)
    packed = _pack(docs)
    expected = list(packed)
    it = iter(packed)
    for k in range(len(expected)):
        state = it.get_state()
        fresh = iter(packed)
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(expected) - k
        for a, b in zip(rest, expected[k:]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
            np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
            np.testing.assert_array_equal(a["positions"], b["positions"])
        next(it)
