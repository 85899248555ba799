"""The tasks with checked answers (jaxlm/data/tasks.py): multi-operand arithmetic, the three
disjoint splits, and the task read by supervised stages as conversations and pairs."""

import pytest

from jaxlm.data import conversations, tasks
from tests.rl_fixtures import grpo_config


def test_arithmetic_with_three_operands_is_evaluated_left_to_right():
    examples = tasks.arithmetic_examples(9, "+-", num_operands=3)
    assert len(examples) == 4 * 10 ** 3
    by_prompt = {e["prompt"]: e["answer"] for e in examples}
    assert by_prompt["3+4-2="] == "5" and by_prompt["0-9-9="] == "-18"
    for e in examples:
        assert eval(e["prompt"][:-1]) == int(e["answer"])  # noqa: S307
    # Two operands: the order of the original task, so its held-out split does not move.
    assert tasks.arithmetic_examples(2, "+-")[:3] == [
        {"prompt": "0+0=", "answer": "0"}, {"prompt": "0+1=", "answer": "1"},
        {"prompt": "0+2=", "answer": "2"}]


def test_the_sft_train_and_eval_splits_are_disjoint_and_cover_the_task():
    config = grpo_config(max_operand=9, num_operands=3, sft_fraction=0.5)
    config.data.eval_fraction = 0.1
    splits = {s: {e["prompt"] for e in tasks.split_examples(config, s)}
              for s in ("train", "sft", "eval")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1800, "sft": 1800, "eval": 400}
    assert not splits["train"] & splits["sft"] and not splits["eval"] & (splits["train"]
                                                                          | splits["sft"])
    # The held-out split does not depend on rl.sft_fraction; without one there is no sft split.
    no_sft = grpo_config(max_operand=9, num_operands=3)
    no_sft.data.eval_fraction = 0.1
    assert {e["prompt"] for e in tasks.split_examples(no_sft, "eval")} == splits["eval"]
    assert len(tasks.split_examples(no_sft, "train")) == 3600
    with pytest.raises(ValueError, match="config key rl.sft_fraction"):
        tasks.split_examples(no_sft, "sft")


def test_supervised_stages_read_the_task_as_conversations_and_pairs():
    config = grpo_config(sft_fraction=0.5)
    config.sft.paths = config.reward.paths = "task"
    sft_prompts = {e["prompt"]: e["answer"] for e in tasks.split_examples(config, "sft")}
    convs = conversations.read_split(conversations.read_conversations, config, "sft", "train")
    assert {c[0]["content"]: c[1]["content"] for c in convs} == sft_prompts
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    pairs = conversations.read_split(conversations.read_pairs, config, "reward", "eval")
    held_out = {e["prompt"]: e["answer"] for e in tasks.split_examples(config, "eval")}
    assert {p.prompt[0]["content"]: p.chosen for p in pairs} == held_out
    assert len(pairs) == len(held_out)  # one held-out pair a problem
    for p in pairs:
        assert 1 <= abs(int(p.rejected) - int(p.chosen)) <= 3
    train = conversations.read_split(conversations.read_pairs, config, "reward", "train")
    assert len(train) == 6 * len(sft_prompts)  # every wrong answer off by 1-3
    again = conversations.read_split(conversations.read_pairs, config, "reward", "eval")
    assert [p.rejected for p in again] == [p.rejected for p in pairs]  # fixed, no run seed


def test_pairs_reject_every_kind_of_wrong_answer_and_hold_out_only_held_out_problems():
    config = grpo_config(max_operand=9, num_operands=3, sft_fraction=0.5)
    config.data.eval_fraction = 0.1
    config.reward.paths = "task"
    config.rl.pair_negatives = "near,other,empty,trailing"
    sft = {e["prompt"]: e["answer"] for e in tasks.split_examples(config, "sft")}
    held_out = {e["prompt"]: e["answer"] for e in tasks.split_examples(config, "eval")}
    train = conversations.read_split(conversations.read_pairs, config, "reward", "train")
    assert len(train) == sum(tasks.NEGATIVES.values()) * len(sft)
    for p in train:
        prompt = p.prompt[0]["content"]
        assert prompt in sft and p.chosen == sft[prompt] and p.rejected != p.chosen
    rejected = [p.rejected for p in train]
    assert rejected.count("") == len(sft)  # one empty answer a problem
    not_integers = [r for r in rejected if r and not r.lstrip("-").isdigit()]
    assert len(not_integers) == 2 * len(sft)  # the trailing answers: right answer + more text
    assert all(any(r.startswith(a) for a in sft.values()) for r in not_integers)
    integers = [p for p in train if p.rejected.lstrip("-").isdigit()]
    far = [p for p in integers if abs(int(p.rejected) - int(p.chosen)) > 3]
    assert far and all(p.rejected in set(sft.values()) for p in far)  # other problems' answers
    # Held out: one "near" pair per held-out problem, the same pairs whatever kinds train.
    near = grpo_config(max_operand=9, num_operands=3, sft_fraction=0.5)
    near.data.eval_fraction = 0.1
    near.reward.paths = "task"
    evals = [conversations.read_split(conversations.read_pairs, c, "reward", "eval")
             for c in (config, near)]
    assert evals[0] == evals[1]
    assert {p.prompt[0]["content"]: p.chosen for p in evals[0]} == held_out
    assert not set(held_out) & set(sft)
    for p in evals[0]:
        assert 1 <= abs(int(p.rejected) - int(p.chosen)) <= 3


def test_an_unknown_kind_of_wrong_answer_is_refused():
    from jaxlm.run.config import validate

    config = grpo_config(sft_fraction=0.5)
    config.rl.pair_negatives = "near,typo"
    with pytest.raises(ValueError, match="config key rl.pair_negatives"):
        validate(config)
