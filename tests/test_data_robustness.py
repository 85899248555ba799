"""Bad data is named, never trained on silently: a corrupted record inside a shard, non-UTF-8
or binary text, and data.eval_paths replacing the training holdout."""

import logging
import os
import shutil

import numpy as np
import pytest

from jaxlm.data import pipeline, shards
from jaxlm.data.packing import pipeline_counters
from jaxlm.data.prepare import prepare_shards
from jaxlm.data.sources import RawFilesSource
from jaxlm.run.errors import DataError
from tests import data_fixtures as F
from tests.cli import run_cli


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("robust_data"))
    tok = F.train_tiny_tokenizer(os.path.join(d, "tok"))
    docs = F.synthetic_documents(40, seed=3)
    F.write_jsonl(os.path.join(d, "docs.jsonl"), docs)
    out = os.path.join(d, "shards")
    prepare_shards([os.path.join(d, "docs.jsonl")], out, tok.path, num_shards=2,
                   progress=lambda _: None)
    return {"dir": d, "tok": tok, "out": out}


def _corrupted_copy(prepared, tmp_path) -> tuple[str, str, int]:
    """A copy of the shards with bytes flipped inside one record of shard 0 (its footer and
    record count intact): (directory, shard path, the bad record)."""
    out = str(tmp_path / "copy")
    shutil.copytree(prepared["out"], out)
    path = os.path.join(out, shards.shard_name(0, 2))
    before = shards.verify_shard(path, np.dtype("<u2"))
    assert before[1] == []
    raw = bytearray(open(path, "rb").read())
    for k in range(300, 308):
        raw[k] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(raw))
    n, problems = shards.verify_shard(path, np.dtype("<u2"))
    assert n == before[0] and len(problems) == 1  # the footer check alone would pass
    bad = int(problems[0].split(":record ")[1].split(":")[0])
    return out, path, bad


def _iterator(directory, prepared, **kw):
    data = F.files_config(os.path.join(directory, "*.array_record"), source="arrayrecord",
                          seq_len=16, eval_fraction=0.0, **kw)
    return pipeline.make_pretrain_iterator(data, prepared["tok"], split="train", batch_size=2,
                                           cache_dir=prepared["dir"])


def test_corrupted_record_names_shard_and_record_or_is_skipped_and_counted(prepared,
                                                                          tmp_path):
    out, path, bad = _corrupted_copy(prepared, tmp_path)
    it = _iterator(out, prepared)
    with pytest.raises(DataError, match=rf"{path}:record {bad}: unreadable"):
        for _ in range(200):
            next(it)
    # No row shuffle: its state holds the packer's counters as of the window's start.
    it = _iterator(out, prepared, skip_bad_records=True, shuffle_rows=0)
    for _ in range(200):  # as far as the strict iterator got, and further
        next(it)
    counters = pipeline_counters(it.get_state())
    assert counters["skipped_records"] == 1 and counters["documents"] > 1


def test_verify_shards_and_prepare_data_verify_only_find_the_bad_record(prepared, tmp_path):
    out, path, bad = _corrupted_copy(prepared, tmp_path)
    with pytest.raises(DataError, match=rf"data.verify_shards: .*{path}:record {bad}"):
        _iterator(out, prepared, verify_shards=True)
    proc = run_cli("jaxlm.tools.prepare_data", f"--output_dir={out}", "--verify_only",
                   check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"{path}:record {bad}" in proc.stderr
    good = run_cli("jaxlm.tools.prepare_data", f"--output_dir={prepared['out']}",
                   "--verify_only", timeout=120)
    assert "verified" in good.stdout


def test_non_utf8_and_binary_text_is_counted_warned_and_stopped(tmp_path, caplog):
    good = [f"plain text document {i}\n".encode() for i in range(6)]
    paths = []
    for i, raw in enumerate(good + [b"caf\xe9 latin-1\n", b"\x00\x01\x02binary\x00"]):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        with open(paths[-1], "wb") as f:
            f.write(raw)
    tolerant = RawFilesSource(paths, max_bad_text_fraction=0.05)
    with caplog.at_level(logging.WARNING):
        texts = [tolerant[i] for i in range(len(paths))]
    assert texts[:6] == [g.decode() for g in good]
    assert tolerant._decode.bad == 2 and "\ufffd" in texts[6]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert paths[6] in warned and "not valid UTF-8" in warned and "binary" in warned
    strict = RawFilesSource(paths, max_bad_text_fraction=0.01)
    for i in range(7):
        strict[i]
    with pytest.raises(DataError, match=rf"{paths[7]}: 2 of 8 documents .* "
                                        r"data.max_bad_text_fraction=0.01"):
        strict[7]


def test_eval_paths_keep_every_training_file_and_allow_one_file(tmp_path):
    docs = F.synthetic_documents(12, seed=4)
    F.write_jsonl(str(tmp_path / "train.jsonl"), docs[:10])
    F.write_jsonl(str(tmp_path / "eval.jsonl"), docs[10:])
    data = F.files_config(str(tmp_path / "train.jsonl"), eval_fraction=0.99,
                          eval_paths=str(tmp_path / "eval.jsonl"))
    train = pipeline.document_sets(data, None, "train", str(tmp_path))[0].docs
    evals = pipeline.document_sets(data, None, "eval", str(tmp_path))[0].docs
    assert sorted(train[i] for i in range(len(train))) == sorted(docs[:10])
    assert sorted(evals[i] for i in range(len(evals))) == sorted(docs[10:])
