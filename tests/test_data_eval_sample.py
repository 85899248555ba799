"""The eval sample: a token budget drawn across the whole held-out split, fixed, the same for
any process count, the whole split (each document once) when the budget exceeds it."""

import re

import numpy as np
import pytest

from jaxlm.data import pipeline
from jaxlm.data.eval_sample import make_eval_sample
from tests import data_fixtures as F

SEQ = 32
NUM_HELD = 200


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_sample")
    tok = F.train_tiny_tokenizer(str(d / "tok"))
    held = F.synthetic_documents(NUM_HELD, seed=11)
    # Two held-out files in order: documents 0-99, then 100-199.
    paths = [F.write_jsonl(str(d / f"held{k}.jsonl"), held[100 * k:100 * (k + 1)])
             for k in range(2)]
    train = F.write_jsonl(str(d / "train.jsonl"), F.synthetic_documents(50, seed=12,
                                                                        prefix="train"))
    data = F.files_config(train, eval_paths=",".join(paths), seq_len=SEQ)
    split_tokens = sum(len(tok.encode(t)) + 1 for t in held)  # scored targets of each doc
    return {"tok": tok, "held": held, "data": data, "cache": str(d / "cache"),
            "split_tokens": split_tokens}


def _sample(env, tokens, batch_size=4, **kw):
    return make_eval_sample(env["data"], env["tok"], tokens=tokens, batch_size=batch_size,
                            cache_dir=env["cache"], **kw)


def _tags(batches, tok) -> set[int]:
    """Documents with a tag `doc-<n> ` visible in some row."""
    tags = set()
    for b in batches:
        for row in b["inputs"]:
            tags |= {int(m) for m in re.findall(r"doc-(\d+) ", tok.decode(row[row > 3]))}
    return tags


def test_sample_is_drawn_across_the_whole_split(env):
    budget = env["split_tokens"] // 8
    sample = _sample(env, budget)
    tags = _tags(sample.batches, env["tok"])
    # Every quarter of the split in file order is represented, not the first files only.
    quarters = {t * 4 // NUM_HELD for t in tags}
    assert quarters == {0, 1, 2, 3}, sorted(tags)
    assert sample.files == 2 and not sample.whole_split
    assert sample.split_documents == NUM_HELD
    assert len(tags) <= sample.documents < NUM_HELD
    # The budget in rows of SEQ targets (then padded to whole batches with masked rows).
    rows = np.concatenate([b["loss_mask"] for b in sample.batches])
    assert (rows.sum(axis=1) > 0).sum() == -(-budget // SEQ)
    assert sample.tokens == int(rows.sum()) <= budget
    assert f"{sample.documents} documents from 2 files" in sample.describe()


def test_sample_is_the_same_at_every_call_and_for_any_process_count(env):
    budget = env["split_tokens"] // 5
    first = _sample(env, budget, batch_size=8)
    F.assert_batches_equal(first.batches, _sample(env, budget, batch_size=8).batches)
    env["data"].seed = 3  # the shuffle seed of training plays no part
    try:
        F.assert_batches_equal(first.batches, _sample(env, budget, batch_size=8).batches)
    finally:
        env["data"].seed = 0
    for count in (2, 4):
        parts = [_sample(env, budget, batch_size=8 // count, process_index=p,
                         process_count=count) for p in range(count)]
        assert all(p.tokens == first.tokens and p.documents == first.documents for p in parts)
        for b, whole in enumerate(first.batches):
            for k in whole:
                np.testing.assert_array_equal(
                    np.concatenate([p.batches[b][k] for p in parts]), whole[k])


def test_budget_above_the_split_scores_every_document_once(env):
    sample = _sample(env, 10 * env["split_tokens"])
    assert sample.whole_split and sample.documents == NUM_HELD and sample.files == 2
    assert sample.tokens == env["split_tokens"]
    # All rows in order: their inputs concatenate to the stream of every document once.
    inputs = np.concatenate([b["inputs"].reshape(-1) for b in sample.batches])
    text = env["tok"].decode(inputs[inputs > 3])
    assert sorted(int(t) for t in re.findall(r"doc-(\d+) ", text)) == list(range(NUM_HELD))


def test_eval_iterator_reads_the_split_in_one_fixed_random_order(env):
    def first_batches():
        it = pipeline.make_pretrain_iterator(env["data"], env["tok"], split="eval",
                                             batch_size=4, cache_dir=env["cache"])
        try:
            return F.take(it, 6)
        finally:
            it.close()

    batches = first_batches()
    F.assert_batches_equal(batches, first_batches())
    tags = _tags(batches, env["tok"])
    assert len({t * 4 // NUM_HELD for t in tags}) >= 3, sorted(tags)


def test_bad_budget_is_rejected(env):
    with pytest.raises(ValueError, match="eval token budget"):
        _sample(env, 0)


def test_pretrain_stage_evaluates_on_the_sample(env):
    from jaxlm.run.config import base_config
    from jaxlm.stages import pretrain

    c = base_config()
    c.data = env["data"]
    c.eval.tokens, c.train.global_batch_size = 3 * 8 * SEQ - 5, 8
    assert pretrain.STAGE.eval_batches(c) == 3  # whole batches covering eval.tokens
    it = pretrain.make_data(c, env["tok"], split="eval", batch_size=8, process_index=0,
                            process_count=1, cache_dir=env["cache"])
    F.assert_batches_equal(F.take(it, 3), _sample(env, c.eval.tokens, batch_size=8).batches)
