"""The data config section: defaults pass, each bad value names its key."""

import pytest

from jaxlm.data.config import check_data_config, default_data_config, parse_mixture


def test_defaults_are_valid_and_overridable():
    data = default_data_config()
    check_data_config(data)
    assert data.source == "stdlib" and data.seq_len == 256 and data.vocab_size == 8192
    assert data.tokenizer_path == "" and data.cache_dir == "" and data.num_workers == 0
    data.seq_len = 64  # plain fields, so --config.data.seq_len=64 works
    check_data_config(data)


@pytest.mark.parametrize("key,value,message", [
    ("source", "web", "data.source: 'web' is not one of"),
    ("seq_len", 0, "data.seq_len: must be positive"),
    ("vocab_size", 100, "data.vocab_size: 100 is too small"),
    ("tokenizer_model_type", "wordpiece", "data.tokenizer_model_type"),
    ("eval_fraction", 1.0, r"data.eval_fraction: must lie in \[0, 1\)"),
    ("max_documents", -1, "data.max_documents"),
    ("dedup", "fuzzy", "data.dedup: 'fuzzy' is not one of"),
    ("dedup_threshold", 0.0, r"data.dedup_threshold: must lie in \(0, 1\]"),
    ("seed", -1, "data.seed"),
    ("num_workers", -2, "data.num_workers"),
    ("prefetch_buffer_size", -1, "data.prefetch_buffer_size"),
    ("read_threads", -1, "data.read_threads"),
    ("text_field", "", "data.text_field"),
    ("mixture", "web=/d/*.jsonl", "data.mixture: item 'web=/d/\\*.jsonl' must read"),
])
def test_bad_values_name_their_key(key, value, message):
    data = default_data_config()
    data[key] = value
    with pytest.raises(ValueError, match=f"config key {message}"):
        check_data_config(data)


def test_file_sources_need_paths():
    data = default_data_config()
    data.source = "files"
    with pytest.raises(ValueError, match="config key data.paths: is empty"):
        check_data_config(data)
    data.source, data.paths = "arrayrecord", "/d/*.jsonl"
    with pytest.raises(ValueError, match="config key data.paths: '/d/\\*.jsonl' does not end"):
        check_data_config(data)
    data.source, data.paths = "mixture", ""
    with pytest.raises(ValueError, match="config key data.mixture: is empty"):
        check_data_config(data)


def test_mixture_parsing():
    parts = parse_mixture("web=gs://b/web/*.array_record:0.7, code=/d/code-*.jsonl:0.2,"
                          "stdlib:0.1")
    assert [(c.name, c.spec, c.weight) for c in parts] == [
        ("web", "gs://b/web/*.array_record", 0.7), ("code", "/d/code-*.jsonl", 0.2),
        ("stdlib", "stdlib", 0.1)]
    with pytest.raises(ValueError, match="weight of item 'a=x:0' must be positive"):
        parse_mixture("a=x:0")
    with pytest.raises(ValueError, match="weight 'abc'"):
        parse_mixture("a=x:abc")
    with pytest.raises(ValueError, match="not unique"):
        parse_mixture("a=x:1,a=y:1")
