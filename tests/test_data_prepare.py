"""prepare_data: shards + manifest from txt/jsonl/parquet, read back token for token; bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from jaxlm.data import dedup, pipeline, shards
from jaxlm.data.prepare import prepare_shards
from jaxlm.data.sources import TokenShardSource, expand_globs
from jaxlm.run.errors import ConfigError
from tests import data_fixtures as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELIM = "<|endoftext|>"


def _inputs(d: str, docs: list[str]) -> list[str]:
    with open(os.path.join(d, "a.txt"), "w") as f:
        f.write(DELIM.join(docs[:10]))
    F.write_jsonl(os.path.join(d, "b.jsonl"), docs[10:30])
    F.write_parquet(os.path.join(d, "c.parquet"), docs[30:60])
    return [os.path.join(d, n) for n in ("a.txt", "b.jsonl", "c.parquet")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("prepare"))
    tok = F.train_tiny_tokenizer(os.path.join(d, "tok"))
    docs = F.synthetic_documents(60, seed=5)
    inputs = _inputs(d, docs)
    out = os.path.join(d, "shards")
    lines = []
    manifest = prepare_shards(inputs, out, tok.path, text_delimiter=DELIM, num_shards=3,
                              progress=lines.append)
    return {"dir": d, "tok": tok, "docs": docs, "inputs": inputs, "out": out,
            "manifest": manifest, "lines": lines, "glob": os.path.join(out, "*.array_record")}


def _arrayrecord_config(glob: str, **kw):
    return F.files_config(glob, source="arrayrecord", **kw)


def test_manifest_counts_documents_tokens_and_tokenizer(prepared):
    m, tok = prepared["manifest"], prepared["tok"]
    expected_tokens = sum(len(tok.encode(d)) for d in prepared["docs"])
    assert m["num_documents"] == 60 and m["num_tokens"] == expected_tokens
    assert [s["name"] for s in m["shards"]] == [shards.shard_name(i, 3) for i in range(3)]
    assert sum(s["documents"] for s in m["shards"]) == 60
    assert sum(s["tokens"] for s in m["shards"]) == expected_tokens
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["dtype"] == "<u2"
    with open(shards.manifest_path(prepared["out"])) as f:
        assert json.load(f)["num_tokens"] == expected_tokens
    assert "tokens/s" in prepared["lines"][-1]


def test_shards_read_back_token_for_token(prepared):
    tok, docs = prepared["tok"], prepared["docs"]
    source = TokenShardSource(expand_globs([prepared["glob"]], "data.paths"), tok)
    assert len(source) == 60
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(source[i], tok.encode(doc))
    # Through the whole pipeline, in order: the packed stream is BOS doc EOS BOS doc EOS ...
    data = _arrayrecord_config(prepared["glob"], eval_fraction=0.0, shuffle=False)
    stream = np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs])
    rows = -(-len(stream) // data.seq_len)
    it = pipeline.make_pretrain_iterator(data, tok, split="train", batch_size=1,
                                         cache_dir=prepared["dir"])
    got = np.concatenate([next(it)["inputs"][0] for _ in range(rows)])
    np.testing.assert_array_equal(got[:len(stream)], stream)
    # The tokenizer comes from the manifest when data.tokenizer_path is empty.
    assert pipeline.load_or_train_tokenizer(data, prepared["dir"]).sha256 == tok.sha256


def test_worker_processes_write_the_same_shards(prepared, tmp_path):
    out = str(tmp_path / "mp")
    manifest = prepare_shards(prepared["inputs"], out, prepared["tok"].path,
                              text_delimiter=DELIM, num_shards=3, num_workers=2,
                              progress=lambda _: None)
    assert manifest["shards"] == prepared["manifest"]["shards"]
    for s in manifest["shards"]:
        with open(os.path.join(out, s["name"]), "rb") as a, \
                open(os.path.join(prepared["out"], s["name"]), "rb") as b:
            assert a.read() == b.read()


def test_duplicates_are_removed_before_tokenizing_and_counted(prepared, tmp_path):
    tok = prepared["tok"]
    docs = F.synthetic_documents(30, seed=8, min_words=150, max_words=200)
    words = docs[4].split(" ")
    words[-3] += "x"
    copies = [docs[2].upper(), " ".join(words)]  # an exact copy (case) and a near copy
    path = F.write_jsonl(str(tmp_path / "dup.jsonl"), docs[:10] + copies + docs[10:])
    manifests = {}
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        manifests[workers] = prepare_shards([path], out, tok.path, num_shards=2,
                                            num_workers=workers, progress=lambda _: None)
        source = TokenShardSource(expand_globs([os.path.join(out, "*.array_record")], "p"), tok)
        assert [source[i].tolist() for i in range(len(source))] == [tok.encode(d) for d in docs]
    m = manifests[0]
    assert m["num_documents"] == 30 and m["shards"] == manifests[2]["shards"]
    assert (m["dedup"]["exact_documents"], m["dedup"]["near_documents"]) == (1, 1)
    assert m["dedup"] == manifests[2]["dedup"]
    off = prepare_shards([path], str(tmp_path / "off"), tok.path, progress=lambda _: None,
                         dedup=dedup.Settings("off"))
    assert off["num_documents"] == 32 and off["dedup"]["mode"] == "off"


def test_command_line_tool(prepared, tmp_path):
    out = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.tools.prepare_data",
         f"--input={prepared['inputs'][1]}", f"--output_dir={out}",
         f"--tokenizer={prepared['tok'].path}", "--num_workers=0"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
    assert shards.read_manifest(out)["num_documents"] == 20


def test_existing_output_needs_overwrite(prepared):
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_shards(prepared["inputs"], prepared["out"], prepared["tok"].path)


def test_missing_input_file_is_named(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="--input: '/no/such/file.jsonl' does not exist"):
        prepare_shards(["/no/such/file.jsonl"], str(tmp_path / "o"), prepared["tok"].path)


def test_bad_jsonl_line_is_named_or_counted(prepared, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        f.write('{"text": "good one"}\n{"text": "two"}\nnot json at all\n{"text": "four"}\n')
    with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
        prepare_shards([path], str(tmp_path / "o1"), prepared["tok"].path,
                       progress=lambda _: None)
    manifest = prepare_shards([path], str(tmp_path / "o2"), prepared["tok"].path,
                              skip_bad_records=True, progress=lambda _: None)
    assert manifest["num_documents"] == 3 and manifest["skipped_records"] == 1


def _copy_with_extra_shard(prepared, tmp_path, content: bytes | None):
    """A copy of the shards plus one extra shard listed in the manifest with 0 documents."""
    out = str(tmp_path / "copy")
    shutil.copytree(prepared["out"], out)
    extra = os.path.join(out, "shard-extra.array_record")
    if content is None:  # a valid ArrayRecord file without records
        ArrayRecordWriter(extra, "group_size:1").close()
    else:
        with open(extra, "wb") as f:
            f.write(content)
    manifest = shards.read_manifest(out)
    manifest.pop("by_name")
    manifest["dtype"] = manifest["dtype"].str
    manifest["shards"].append({"name": "shard-extra.array_record", "documents": 0,
                               "tokens": 0})
    with open(shards.manifest_path(out), "w") as f:
        json.dump(manifest, f)
    return out, extra


def test_empty_shard_is_named_or_skipped(prepared, tmp_path):
    out, extra = _copy_with_extra_shard(prepared, tmp_path, None)
    data = _arrayrecord_config(os.path.join(out, "*.array_record"))
    with pytest.raises(ValueError, match=f"shard {extra} is empty"):
        pipeline.make_pretrain_iterator(data, prepared["tok"], split="train", batch_size=2,
                                        cache_dir=prepared["dir"])
    data.skip_bad_records = True
    it = pipeline.make_pretrain_iterator(data, prepared["tok"], split="train", batch_size=2,
                                         cache_dir=prepared["dir"])
    assert next(it)["inputs"].shape == (2, data.seq_len)


def test_unreadable_shard_is_named(prepared, tmp_path):
    out, extra = _copy_with_extra_shard(prepared, tmp_path, b"")
    data = _arrayrecord_config(os.path.join(out, "*.array_record"))
    with pytest.raises(ValueError, match=f"shard {extra} cannot be read"):
        pipeline.make_pretrain_iterator(data, prepared["tok"], split="train", batch_size=2,
                                        cache_dir=prepared["dir"])


def test_shard_missing_from_manifest_is_named(prepared, tmp_path):
    out = str(tmp_path / "stray")
    shutil.copytree(prepared["out"], out)
    stray = os.path.join(out, "shard-99999-of-99999.array_record")
    shutil.copy(os.path.join(out, shards.shard_name(0, 3)), stray)
    data = _arrayrecord_config(os.path.join(out, "*.array_record"))
    with pytest.raises(ValueError, match=f"shard {stray} is not listed"):
        pipeline.make_pretrain_iterator(data, prepared["tok"], split="train", batch_size=2,
                                        cache_dir=prepared["dir"])


def test_tokenizer_that_does_not_match_the_shards_is_rejected(prepared, tmp_path):
    other = F.train_tiny_tokenizer(str(tmp_path / "other"), vocab_size=330)
    data = _arrayrecord_config(prepared["glob"], tokenizer_path=other.path)
    with pytest.raises(ValueError, match=r"manifest.json: shards were tokenized with .*"
                                         r"data.tokenizer_path"):
        pipeline.make_pretrain_iterator(data, other, split="train", batch_size=2,
                                        cache_dir=prepared["dir"])
