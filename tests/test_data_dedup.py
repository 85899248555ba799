"""Deduplication before the split: exact and near copies go, the result is fixed, the split made
from the kept documents has no held-out document near a training one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import corpus, dedup, pipeline
from tests import data_fixtures as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEAR = dedup.Settings("near", 0.8)


def _jaccard(a: str, b: str) -> float:
    x, y = (set(dedup.shingles(dedup.normalize(t))) for t in (a, b))
    return len(x & y) / len(x | y)


def _near_copy(doc: str, k: int) -> str:
    """`doc` with its k-th word from the end changed: a few shingles differ, most do not."""
    words = doc.split(" ")
    words[-k] = words[-k] + "x"
    return " ".join(words)


def _corpus(n: int = 60, seed: int = 3) -> tuple[list[str], dict[int, int], dict[int, int]]:
    """Long random documents, then exact copies (other spacing and case) of a few and near
    copies of a few others: (documents, exact copy -> original, near copy -> original)."""
    docs = F.synthetic_documents(n, seed=seed, min_words=150, max_words=200)
    exact, near = {}, {}
    for i in range(0, 10, 2):
        exact[len(docs)] = i
        docs.append("  " + docs[i].upper().replace(" ", "\t  "))
    for i in range(1, 20, 2):
        near[len(docs)] = i
        docs.append(_near_copy(docs[i], 3))
    return docs, exact, near


def _run(docs, settings=NEAR):
    return dedup.deduplicate([[(f"d{i}", d) for i, d in enumerate(docs)]], settings)


def test_constructed_copies_are_what_they_claim():
    docs, exact, near = _corpus()
    for copy, orig in exact.items():
        assert dedup.normalize(docs[copy]) == dedup.normalize(docs[orig])
        assert docs[copy] != docs[orig]
    for copy, orig in near.items():
        assert 0.85 < _jaccard(docs[copy], docs[orig]) < 1
    assert max(_jaccard(docs[i], docs[j]) for i in range(10) for j in range(i)) < 0.1


def test_exact_and_near_duplicates_are_removed_and_counted():
    docs, exact, near = _corpus()
    result = _run(docs)
    kept = set(result.kept[0].tolist())
    assert kept == set(range(len(docs))) - set(exact) - set(near)
    r = result.report
    assert (r.documents, r.exact_documents, r.near_documents) == (len(docs), 5, 10)
    assert r.exact_chars == sum(len(docs[i]) for i in exact)
    assert r.near_chars == sum(len(docs[i]) for i in near)
    assert r.chars == sum(map(len, docs))
    assert [f"d{list(near)[0]}", f"d{near[list(near)[0]]}"] in r.examples
    # "exact" keeps the near copies.
    kept_exact = set(_run(docs, dedup.Settings("exact")).kept[0].tolist())
    assert kept_exact == set(range(len(docs))) - set(exact)


def test_text_without_spaces_is_shingled_by_characters():
    rng = np.random.default_rng(0)
    text = "".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 2000, size=600))
    copy = text[:300] + "的" + text[301:]
    other = "".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 2000, size=600))
    assert 0.9 < _jaccard(text, copy) < 1
    result = _run([text, copy, other])
    assert result.kept[0].tolist() == [0, 2]


def test_non_text_and_empty_documents_are_kept_and_not_counted():
    result = dedup.deduplicate([[("a", "same text"), ("b", None), ("c", " \n"), ("d", " \n"),
                                 ("e", "Same  TEXT")]], NEAR)
    assert result.kept[0].tolist() == [0, 1, 2, 3]
    assert result.report.documents == 2 and result.report.exact_documents == 1


def test_same_result_in_every_run_and_process():
    docs, _, _ = _corpus(n=40, seed=9)
    first, again = _run(docs), _run(docs)
    assert first.kept[0].tolist() == again.kept[0].tolist()
    assert first.report == again.report
    # Another interpreter with another hash seed computes the same signatures.
    code = ("import json, sys; from jaxlm.data import dedup; from tests import data_fixtures as F;"
            "from tests.test_data_dedup import _corpus, _run; docs = _corpus(n=40, seed=9)[0];"
            "r = _run(docs); print(json.dumps([r.kept[0].tolist(), "
            "r.signatures[0][3][0].tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "12345",
                                        "PYTHONPATH": REPO})
    kept, signature = json.loads(out.stdout)
    assert kept == first.kept[0].tolist()
    assert signature == first.signatures[0][3][0].tolist()


def _split_docs(env, data, split):
    ds = pipeline.document_sets(data, env["tok"], split, env["cache"])[0].docs
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    docs, exact, near = _corpus(n=120, seed=4)
    path = F.write_jsonl(str(d / "docs.jsonl"), docs)
    return {"dir": str(d), "tok": F.train_tiny_tokenizer(str(d / "tok")), "docs": docs,
            "exact": exact, "near": near, "path": path, "cache": str(d / "cache")}


def _straddling(train: list[str], held: list[str]) -> int:
    """Held-out documents with a training document of true Jaccard >= 0.8 (brute force)."""
    return sum(any(_jaccard(h, t) >= 0.8 for t in train) for h in held)


@pytest.mark.parametrize("mode", ["off", "exact", "near"])
def test_split_is_made_after_dedup(env, mode):
    data = F.files_config(env["path"], eval_fraction=0.3, dedup=mode)
    train, held = _split_docs(env, data, "train"), _split_docs(env, data, "eval")
    kept = train + held
    assert len(set(kept)) == len(kept)
    removed = {"off": set(), "exact": set(env["exact"]),
               "near": set(env["exact"]) | set(env["near"])}[mode]
    assert sorted(kept) == sorted(d for i, d in enumerate(env["docs"]) if i not in removed)
    # A 30% holdout of 135 documents splits several of the 15 copy pairs when nothing is
    # removed; after near dedup no held-out document is near any training document.
    straddling = _straddling(train, held)
    assert (straddling == 0) == (mode == "near"), straddling
    report = pipeline.document_sets(data, env["tok"], "train", env["cache"])[0].dedup
    if mode == "off":
        assert report is None
        return
    assert (report.exact_documents, report.near_documents) == (5, 10 if mode == "near" else 0)
    # The contamination check sees what the brute force sees.
    assert report.contamination.checked == len(held)
    assert report.contamination.documents == straddling
    # Stored beside the kept indices in the cache.
    stored = [json.load(open(os.path.join(env["cache"], n, "report.json")))
              for n in os.listdir(env["cache"]) if n.startswith("dedup-")]
    assert report.to_json() in stored


def test_eval_paths_drop_training_copies_of_held_out_documents(env, tmp_path):
    docs, near = env["docs"], env["near"]
    copies = list(near)
    held_path = F.write_jsonl(str(tmp_path / "held.jsonl"), [docs[near[c]] for c in copies])
    train_path = F.write_jsonl(str(tmp_path / "train.jsonl"),
                               [d for i, d in enumerate(docs) if i not in near.values()])
    data = F.files_config(train_path, eval_paths=held_path)
    train, held = _split_docs(env, data, "train"), _split_docs(env, data, "eval")
    assert held == [docs[near[c]] for c in copies]  # the held-out set stays whole
    assert not {docs[c] for c in copies} & set(train)  # its near copies left training
    assert _straddling(train, held) == 0


def test_processes_together_read_each_kept_document_once(env):
    data = F.files_config(env["path"], eval_fraction=0.3)
    docs = pipeline.document_sets(data, env["tok"], "train", env["cache"])[0].docs
    n = len(docs)
    one = [docs[i] for i in range(n)]
    for count in (2, 3):
        epoch = []
        for p in range(count):
            stream = pipeline.document_stream(docs, split="train", shuffle=True, seed=0,
                                              process_index=p, process_count=count)
            epoch.extend(stream[i] for i in range(len(range(p, n, count))))
        assert sorted(epoch) == sorted(one)
    assert not {env["docs"][c] for c in env["near"]} & set(one)


def test_resume_with_dedup_continues_the_sequence(env):
    data = F.files_config(env["path"], read_threads=2, prefetch_buffer_size=3, dedup="near")
    it = pipeline.make_pretrain_iterator(data, env["tok"], split="train", batch_size=4,
                                         cache_dir=env["cache"])
    F.take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = F.take(it, 6)
    fresh = pipeline.make_pretrain_iterator(data, env["tok"], split="train", batch_size=4,
                                            cache_dir=env["cache"])
    fresh.set_state(state)
    F.assert_batches_equal(expected, F.take(fresh, 6))


def test_stdlib_corpus_reads_held_out_files_first(tmp_path):
    """On a small stand-in for the standard library: copies of a held-out module leave training,
    the held-out module stays, and the report is stored in the corpus's meta.json."""
    root = tmp_path / "lib"
    root.mkdir()
    texts = F.synthetic_documents(12, seed=2, min_words=150, max_words=200)
    names = [f"mod{i}.py" for i in range(12)]
    for name, text in zip(names, texts):
        (root / name).write_text(text)
    held = corpus.split_files(names, 0.1)["eval"][0]
    (root / "copy_exact.py").write_text(texts[names.index(held)])
    (root / "copy_near.py").write_text(_near_copy(texts[names.index(held)], 2))
    assert corpus.split_files(names + ["copy_exact.py", "copy_near.py"], 0.1)["eval"] == [held]
    built = corpus.build_stdlib_corpus(str(tmp_path / "cache"), eval_fraction=0.1,
                                       root=str(root))
    assert built.files["eval"] == [[held, 1]] and built.file_of("eval")(0) == held
    assert [f for f, _ in built.files["train"]] == [
        f for f in corpus.split_files(names, 0.1)["train"]]
    r = built.dedup
    assert (r.exact_documents, r.near_documents) == (1, 1)
    assert r.contamination.checked == 1 and r.contamination.documents == 0
    with open(os.path.join(built.directory, "meta.json")) as f:
        assert json.load(f)["dedup"]["near_documents"] == 1
    off = corpus.build_stdlib_corpus(str(tmp_path / "cache"), eval_fraction=0.1,
                                     root=str(root), dedup=dedup.Settings("off"))
    assert off.num_documents["train"] == 13 and off.directory != built.directory
