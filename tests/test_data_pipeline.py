"""The grain pipeline: layout, determinism, process sharding, resume, mixtures, bad input."""

import json
import os
import re

import grain
import numpy as np
import pytest

from jaxlm.data import pipeline
from jaxlm.data.packing import pipeline_counters
from jaxlm.data.sources import RawFilesSource
from tests import data_fixtures as F

BATCH = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny tokenizer and two jsonl files of tagged documents (web-like and numbers-only)."""
    d = tmp_path_factory.mktemp("pipeline")
    tok = F.train_tiny_tokenizer(str(d / "tok"))
    docs = F.synthetic_documents(300, seed=1)
    F.write_jsonl(str(d / "a.jsonl"), docs[:150])
    F.write_jsonl(str(d / "b.jsonl"), docs[150:])
    numbers = [f"num-{i} " + " ".join(str(x) for x in range(i, i + 40)) + "\n"
               for i in range(100)]
    F.write_jsonl(str(d / "numbers.jsonl"), numbers)
    return {"dir": str(d), "tok": tok, "docs": docs, "glob": str(d / "[ab].jsonl"),
            "numbers": str(d / "numbers.jsonl"), "cache": str(d / "cache")}


def _iterator(env, data, split="train", batch_size=BATCH, **kw):
    return pipeline.make_pretrain_iterator(data, env["tok"], split=split, batch_size=batch_size,
                                           cache_dir=env["cache"], **kw)


def _doc_tags(batches, tok, prefix="doc"):
    """Tags of the documents that start (with BOS) inside the batches."""
    tags = set()
    for b in batches:
        for inputs, seg in zip(b["inputs"], b["segment_ids"]):
            for s in np.unique(seg[seg > 0]):
                piece = inputs[seg == s]
                if piece[0] == tok.bos_id and len(piece) > 6:
                    m = re.match(rf"{prefix}-(\d+) ", tok.decode(piece[1:]))
                    # Only the row's last piece may be cut before its tag ends.
                    assert m or s == seg.max(), tok.decode(piece[1:])
                    if m:
                        tags.add(int(m.group(1)))
    return tags


def test_batch_layout(env):
    data = F.files_config(env["glob"])
    batch = next(_iterator(env, data))
    assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    for k, v in batch.items():
        assert v.shape == (BATCH, data.seq_len), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    seg = batch["segment_ids"]
    # The mask drops exactly the targets that start another document (the BOS of the next).
    crossing = np.zeros_like(seg, bool)
    crossing[:, :-1] = seg[:, 1:] != seg[:, :-1]
    assert (batch["loss_mask"][crossing[:, :-1].nonzero()] == 0).all()
    assert (batch["targets"][batch["loss_mask"] == 0] == env["tok"].bos_id).all()
    assert batch["inputs"][batch["positions"] == 0].size > 0


def test_same_seed_same_batches_other_seed_differs(env):
    data = F.files_config(env["glob"], read_threads=2, prefetch_buffer_size=2)
    first = F.take(_iterator(env, data), 5)
    F.assert_batches_equal(first, F.take(_iterator(env, data), 5))
    data.seed = 1
    other = F.take(_iterator(env, data), 5)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def test_processes_read_disjoint_slices_that_cover_every_document(env):
    data = F.files_config(env["glob"])
    docs = pipeline.document_sets(data, env["tok"], "train", env["cache"])[0].docs
    n = len(docs)
    for count in (1, 2, 3):
        epoch = []
        for p in range(count):
            stream = pipeline.document_stream(docs, split="train", shuffle=True, seed=0,
                                              process_index=p, process_count=count)
            epoch.extend(stream[i] for i in range(len(range(p, n, count))))
        assert sorted(epoch) == sorted(docs[i] for i in range(n))
    # At the batch level: the first batches of two processes share no document.
    tags = [_doc_tags(F.take(_iterator(env, data, process_index=p, process_count=2), 4),
                      env["tok"]) for p in range(2)]
    assert tags[0] and tags[1] and not tags[0] & tags[1]


def test_eval_split_is_held_out_fixed_and_repeating(env):
    data = F.files_config(env["glob"])
    train = pipeline.document_sets(data, env["tok"], "train", env["cache"])[0].docs
    held = pipeline.document_sets(data, env["tok"], "eval", env["cache"])[0].docs
    train_docs = {train[i] for i in range(len(train))}
    eval_docs = {held[i] for i in range(len(held))}
    assert len(eval_docs) == 30 and not train_docs & eval_docs
    assert train_docs | eval_docs == set(env["docs"])
    data.seed = 7  # the holdout does not depend on the shuffle seed
    held7 = pipeline.document_sets(data, env["tok"], "eval", env["cache"])[0].docs
    assert {held7[i] for i in range(len(held7))} == eval_docs
    many = F.take(_iterator(env, data, split="eval"), 12)  # more than one pass
    F.assert_batches_equal(many[:3], F.take(_iterator(env, data, split="eval"), 3))
    eval_tags = {int(d.split()[0][4:]) for d in eval_docs}
    assert _doc_tags(many, env["tok"]) <= eval_tags


def test_eval_paths_replace_the_holdout(env):
    data = F.files_config(os.path.join(env["dir"], "a.jsonl"),
                          eval_paths=os.path.join(env["dir"], "b.jsonl"))
    held = pipeline.document_sets(data, env["tok"], "eval", env["cache"])[0].docs
    assert [held[i] for i in range(len(held))] == env["docs"][150:]


@pytest.mark.parametrize("mixture", [False, True])
def test_resume_after_7_batches_continues_the_sequence(env, mixture):
    extra = {"source": "mixture", "mixture": f"web={env['glob']}:0.7,nums={env['numbers']}:0.3"}
    data = F.files_config(env["glob"], read_threads=2, prefetch_buffer_size=3,
                          **(extra if mixture else {}))
    it = _iterator(env, data)
    F.take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = F.take(it, 6)
    fresh = _iterator(env, data)
    fresh.set_state(state)
    F.assert_batches_equal(expected, F.take(fresh, 6))


def _rows(batches: list[dict[str, np.ndarray]]) -> list[bytes]:
    return [np.concatenate([b[k][r] for k in ("inputs", "targets", "segment_ids")]).tobytes()
            for b in batches for r in range(len(b["inputs"]))]


def test_row_shuffle_permutes_each_window_of_packed_rows(env):
    window = 64
    plain = _rows(F.take(_iterator(env, F.files_config(env["glob"], shuffle_rows=0)),
                         2 * window // BATCH))
    shuffled = _rows(F.take(_iterator(env, F.files_config(env["glob"], shuffle_rows=window)),
                            2 * window // BATCH))
    for w in range(2):  # the same rows, window by window: nothing dropped or repeated
        part = slice(w * window, (w + 1) * window)
        assert sorted(plain[part]) == sorted(shuffled[part])
    # Without the shuffle consecutive rows are consecutive pieces of the stream (a long
    # document fills whole batches); with it few neighbours survive.
    plain_next = dict(zip(plain[:-1], plain[1:]))
    kept = sum(plain_next.get(a) == b for a, b in zip(shuffled[:-1], shuffled[1:]))
    assert kept <= window // 8, kept
    assert sum(a == b for a, b in zip(plain, shuffled)) <= window // 8


def test_resume_inside_and_across_row_shuffle_windows(env):
    data = F.files_config(env["glob"], shuffle_rows=12)
    it = _iterator(env, data)
    F.take(it, 7)  # 28 rows: inside the third window of 12
    state = json.loads(json.dumps(it.get_state()))
    expected = F.take(it, 6)
    fresh = _iterator(env, data)
    fresh.set_state(state)
    F.assert_batches_equal(expected, F.take(fresh, 6))


@pytest.mark.slow
def test_resume_with_worker_processes(env):
    # No row shuffle: its state holds the counters as of the window start, not the current row.
    data = F.files_config(env["glob"], num_workers=2, prefetch_buffer_size=2, shuffle_rows=0)
    it = _iterator(env, data)
    try:
        F.take(it, 7)
        state = json.loads(json.dumps(it.get_state()))
        expected = F.take(it, 5)
    finally:
        it.close()
    fresh = _iterator(env, data)
    try:
        fresh.set_state(state)
        F.assert_batches_equal(expected, F.take(fresh, 5))
        assert pipeline_counters(fresh.get_state())["rows"] == 12 * BATCH
    finally:
        fresh.close()


def test_mixture_weights_are_respected_and_deterministic(env):
    data = F.files_config(env["glob"], source="mixture",
                          mixture=f"web={env['glob']}:0.7,nums={env['numbers']}:0.3")
    batches = F.take(_iterator(env, data, batch_size=10), 10)
    rows = [row for b in batches for row in b["inputs"]]
    numeric = [set(env["tok"].decode(r)) <= set("0123456789 -num\n") for r in rows]
    assert abs(np.mean(numeric) - 0.3) <= 0.05
    F.assert_batches_equal(batches, F.take(_iterator(env, data, batch_size=10), 10))


def test_missing_file_names_the_pattern(env):
    data = F.files_config(os.path.join(env["dir"], "nope-*.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data.paths: '.*nope-\*.jsonl' matches no file"):
        _iterator(env, data)


def test_jsonl_line_without_text_field_names_file_and_line(env, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        f.write('{"text": "a fine document"}\n{"body": "wrong field"}\n{"text": "more"}\n')
    data = F.files_config(path, eval_fraction=0.0, shuffle=False)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: no field 'text'")):
        next(_iterator(env, data))
    data.skip_bad_records = True
    it = _iterator(env, data)
    next(it)
    counts = pipeline_counters(it.get_state())
    assert counts["skipped_records"] >= 1 and counts["documents"] >= 2


def test_errors_in_worker_processes_reach_the_caller(env, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        f.write('{"text": "fine"}\n{"body": "wrong field"}\n')
    it = _iterator(env, F.files_config(path, eval_fraction=0.0, shuffle=False, num_workers=1))
    try:
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: no field 'text'")):
            next(it)
    finally:
        it.close()


def test_all_bad_records_raise_instead_of_hanging(env, tmp_path):
    path = str(tmp_path / "allbad.jsonl")
    with open(path, "w") as f:
        f.write('{"body": 1}\n' * 5)
    data = F.files_config(path, eval_fraction=0.0, skip_bad_records=True)
    with pytest.raises(ValueError, match="no tokens"):
        next(_iterator(env, data))


def test_tokenizer_without_bos_is_rejected_when_bos_is_asked(env):
    class NoBos:
        path, bos_id, eos_id, pad_id, vocab_size = "x.model", -1, 3, 0, 300

    data = F.files_config(env["glob"])
    with pytest.raises(ValueError, match="data.add_bos"):
        pipeline.make_pretrain_iterator(data, NoBos(), split="train", batch_size=2,
                                        cache_dir=env["cache"])


def test_on_the_fly_tokenizer_is_cached_and_keyed(env, tmp_path):
    data = F.files_config(env["glob"], vocab_size=340)
    tok = pipeline.load_or_train_tokenizer(data, str(tmp_path))
    mtime = os.stat(tok.path).st_mtime_ns
    again = pipeline.load_or_train_tokenizer(data, str(tmp_path))
    assert again.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime
    data.vocab_size = 350
    other = pipeline.load_or_train_tokenizer(data, str(tmp_path))
    assert other.path != tok.path and other.vocab_size == 350
    text = "doc-1 the café = 42.\n"
    assert tok.decode(tok.encode(text)) == text


def test_stdlib_source_end_to_end(tmp_path):
    data = F.files_config("", source="stdlib", max_documents=40, vocab_size=400,
                          seq_len=64)
    tok = pipeline.load_or_train_tokenizer(data, str(tmp_path))
    assert tok.vocab_size == 400 and os.path.dirname(tok.path) == str(tmp_path)
    train = next(pipeline.make_pretrain_iterator(data, tok, split="train", batch_size=2,
                                                 cache_dir=str(tmp_path)))
    held = next(pipeline.make_pretrain_iterator(data, tok, split="eval", batch_size=2,
                                                cache_dir=str(tmp_path)))
    assert train["inputs"].shape == held["inputs"].shape == (2, 64)
    assert train["loss_mask"].sum() > 0 and held["loss_mask"].sum() > 0


def test_file_index_is_cached_and_follows_changes(tmp_path):
    path = F.write_jsonl(str(tmp_path / "grow.jsonl"), ["one", "two", "three"])
    cache_dir = str(tmp_path / "cache")
    assert len(RawFilesSource([path], index_cache_dir=cache_dir)) == 3
    assert len(os.listdir(os.path.join(cache_dir, "file-index"))) == 1
    with open(path, "a") as f:
        f.write('{"text": "four"}\n')
    source = RawFilesSource([path], index_cache_dir=cache_dir)
    assert len(source) == 4 and source[3] == "four"


def test_grain_iterator_interface(env):
    it = _iterator(env, F.files_config(env["glob"]))
    assert isinstance(it, grain.DatasetIterator)
    assert callable(it.get_state) and callable(it.set_state)
