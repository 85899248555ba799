"""The train/eval split of SFT conversations and preference pairs (conversations.read_split):
one rule for every stage section, eval_paths replacing the fixed holdout."""

import json

import pytest

from jaxlm.data import conversations, preference
from jaxlm.run import config as config_lib


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _pairs(n, tag):
    return [{"prompt": f"{tag} question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(n)]


def _conversation(i):
    return {"messages": [{"role": "user", "content": f"hi {i}"},
                         {"role": "assistant", "content": f"hello {i}"}]}


def test_holdout_is_a_fixed_partition():
    items = list(range(20))
    eval_items = conversations.holdout(items, "eval", 0.1, "sft.paths")
    train_items = conversations.holdout(items, "train", 0.1, "sft.paths")
    # ceil(0.1 * 20) = 2 held out, chosen by the fixed permutation (frozen: it must not move).
    assert eval_items == [1, 18]
    assert sorted(eval_items + train_items) == items
    assert train_items == sorted(train_items)
    assert len(conversations.holdout(items, "eval", 0.01, "k")) == 1  # ceil, never 0


def test_holdout_errors_name_the_key():
    with pytest.raises(ValueError, match="data.eval_fraction: is 0, so dpo.paths has no eval"):
        conversations.holdout([1, 2, 3], "eval", 0.0, "dpo.paths")
    with pytest.raises(ValueError, match="leaves none of the 3 examples of sft.paths"):
        conversations.holdout([1, 2, 3], "train", 1.0, "sft.paths")


@pytest.mark.parametrize("section", ["dpo", "reward"])
def test_pair_splits_follow_the_section(tmp_path, section):
    c = config_lib.base_config()
    c[section].paths = _write_jsonl(tmp_path / "train.jsonl", _pairs(20, "t"))
    c.data.eval_fraction = 0.1
    train = preference.split_pairs(c, "train", section)
    held = preference.split_pairs(c, "eval", section)
    assert [p.chosen for p in held] == ["yes 1", "yes 18"]
    assert len(train) == 18 and not {p.chosen for p in train} & {p.chosen for p in held}
    c.data.seed = 5  # the holdout does not depend on the data seed
    assert preference.split_pairs(c, "eval", section) == held
    c[section].eval_paths = _write_jsonl(tmp_path / "eval.jsonl", _pairs(3, "e"))
    assert [p.prompt[0]["content"] for p in preference.split_pairs(c, "eval", section)] == \
        ["e question 0", "e question 1", "e question 2"]
    assert preference.split_pairs(c, "train", section) == train


def test_conversation_split_and_keys(tmp_path):
    c = config_lib.base_config()
    c.sft.paths = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(i) for i in range(20)])
    c.data.eval_fraction = 0.1
    held = conversations.read_split(conversations.read_conversations, c, "sft", "eval")
    assert [m[0]["content"] for m in held] == ["hi 1", "hi 18"]
    c.sft.eval_paths = str(tmp_path / "missing-*.jsonl")
    with pytest.raises(FileNotFoundError, match="config key sft.eval_paths"):
        conversations.read_split(conversations.read_conversations, c, "sft", "eval")


@pytest.mark.parametrize("section", ["dpo", "reward"])
@pytest.mark.parametrize("held_out,examples,processes", [(5, 8, 1), (13, 8, 1), (5, 8, 2)])
def test_an_evaluation_reads_each_held_out_pair_once(tmp_path, section, held_out, examples,
                                                     processes):
    """A pair stage's evaluation reads ceil(eval.examples / batch) batches: the first
    eval.examples held-out pairs once each (all of them when there are fewer), then empty rows
    without tokens (pair_id -1), never a pair a second time."""
    from jaxlm.stages.stage import example_eval_batches
    from tests.rl_fixtures import CharTokenizer

    c = config_lib.base_config()
    c[section].paths = _write_jsonl(tmp_path / "train.jsonl", _pairs(10, "t"))
    c[section].eval_paths = _write_jsonl(tmp_path / "eval.jsonl", _pairs(held_out, "e"))
    c.eval.examples, c.train.global_batch_size, c.data.seq_len = examples, 4, 48
    batches = example_eval_batches(c)
    rows = []
    for p in range(processes):
        it = preference.make_pair_iterator(c, CharTokenizer(), split="eval",
                                           batch_size=4 // processes, process_index=p,
                                           process_count=processes, section=section)
        rows += [(int(i), seg) for _ in range(batches)
                 for b in [next(it)] for i, seg in zip(b["pair_id"], b["segment_ids"])]
    assert len(rows) == batches * 4
    ids = sorted(i for i, _ in rows if i >= 0)
    assert ids == list(range(min(held_out, examples)))
    assert all((seg > 0).any(-1).all() == (i >= 0) for i, seg in rows)  # empty rows: no tokens
