"""The embedded stdlib corpus: no tests inside, deterministic file-level split, cached builds."""

import os

from array_record.python.array_record_module import ArrayRecordReader

from jaxlm.data import corpus


def test_file_list_leaves_out_tests_and_installed_packages():
    files = corpus.stdlib_files(corpus.stdlib_root())
    assert len(files) > 100 and "os.py" in files
    for f in files:
        parts = f.split(os.sep)
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), f
        assert not parts[-1].startswith("test_"), f


def test_documents_reassemble_their_file():
    root = corpus.stdlib_root()
    for name in ("os.py", "json/decoder.py", "functools.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            source = f.read()
        docs = corpus.split_documents(source)
        assert len(docs) > 1 and "".join(docs) == source
        for doc in docs[1:]:
            assert doc.startswith(("def ", "class ", "async def ", "@")), doc[:40]


def test_decorators_stay_with_their_function():
    source = "x = 1\n" * 100 + "@decorator\ndef f():\n    pass\n" * 50
    for doc in corpus.split_documents(source, min_chars=10)[1:]:
        assert doc.startswith("@decorator\ndef f")


def test_split_is_by_file_deterministic_and_disjoint():
    files = corpus.stdlib_files(corpus.stdlib_root())
    split = corpus.split_files(files, 0.02)
    assert split == corpus.split_files(list(reversed(files)), 0.02)
    assert not set(split["eval"]) & set(split["train"])
    assert len(split["eval"]) == round(0.02 * len(files))
    assert len(split["train"]) + len(split["eval"]) == len(files)


def test_build_is_capped_cached_and_keyed(tmp_path):
    built = corpus.build_stdlib_corpus(str(tmp_path), max_documents=30, eval_fraction=0.1)
    assert built.num_documents == {"train": 30, "eval": 3}
    reader = ArrayRecordReader(built.path("train"))
    assert reader.num_records() == 30 and reader.read([0])[0].decode().strip()
    meta = os.path.join(built.directory, "meta.json")
    mtime = os.stat(meta).st_mtime_ns
    again = corpus.build_stdlib_corpus(str(tmp_path), max_documents=30, eval_fraction=0.1)
    assert again == built and os.stat(meta).st_mtime_ns == mtime
    other = corpus.build_stdlib_corpus(str(tmp_path), max_documents=20, eval_fraction=0.1)
    assert other.directory != built.directory
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
