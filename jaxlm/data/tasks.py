"""Prompts with checked answers: the procedural arithmetic task and jsonl files.

An example is `{"prompt": str, "answer": str}`. The arithmetic task enumerates every
`a <op> b [<op> c ...]` with rl.num_operands operands in [0, rl.max_operand] ("3+4-2=" -> "5",
evaluated left to right). Like the jsonl task, its held-out share is data.eval_fraction of the
examples under a fixed permutation, so the train and eval prompts never overlap and do not
depend on any seed.

Three splits of a task:

    eval    data.eval_fraction of the examples (or rl.eval_paths): held-out prompts
    sft     rl.sft_fraction of the rest: problems set aside for supervised stages that read
            the task (`sft.paths`, `reward.paths` or `dpo.paths` = "task"), so the policy an
            RL run starts from has never seen its prompts
    train   the rest: the RL stages' prompts

A supervised stage reads the task as conversations (the prompt a user turn, the answer the
assistant's) or, for the pair stages, as preference pairs (chosen: the answer; rejected: a
wrong answer of the kinds in rl.pair_negatives, `task_pairs`); its train split is the task's
`sft` split and its eval split the task's `eval`.
"""

from __future__ import annotations

import itertools
import json
import operator

import ml_collections
import numpy as np

from jaxlm.data.config import split_list
from jaxlm.data.conversations import Pair, holdout
from jaxlm.data.sources import expand_globs
from jaxlm.run.errors import ConfigError

Example = dict[str, str]
# `sft.paths` / `reward.paths` / `dpo.paths` value that reads config.rl's task.
TASK = "task"
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# Seed of the rejected answers of a task's preference pairs (fixed: no run seed moves them).
_PAIR_SEED = 1_234


def arithmetic_examples(max_operand: int, operations: str, num_operands: int = 2
                        ) -> list[Example]:
    """Every `a op b [op c ...]` with operands in [0, max_operand], evaluated left to right,
    in a fixed order."""
    values = range(max_operand + 1)
    out = []
    for ops in itertools.product(operations, repeat=num_operands - 1):
        for operands in itertools.product(values, repeat=num_operands):
            result, text = operands[0], str(operands[0])
            for op, x in zip(ops, operands[1:]):
                result, text = _OPS[op](result, x), f"{text}{op}{x}"
            out.append({"prompt": f"{text}=", "answer": str(result)})
    return out


def read_jsonl(spec: str, key: str) -> list[Example]:
    """{"prompt", "answer"} records of the files matching the comma-separated globs `spec`."""
    out = []
    for path in expand_globs(split_list(spec), key):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record.get("prompt"), str):
                    raise ConfigError(f"config key {key}: {path}:{n} has no string 'prompt'")
                out.append({"prompt": record["prompt"], "answer": str(record.get("answer", ""))})
    return out


def heldout_key(config: ml_collections.ConfigDict) -> str | None:
    """rl.eval_paths for the jsonl task; None for arithmetic, whose held-out prompts come only
    from data.eval_fraction."""
    return "rl.eval_paths" if config.rl.task == "jsonl" else None


def split_examples(config: ml_collections.ConfigDict, split: str) -> list[Example]:
    """The examples of `split` ("train", "sft" or "eval", see the module doc) of config.rl's
    task."""
    r = config.rl
    if r.task == "arithmetic":
        examples, key = arithmetic_examples(r.max_operand, r.operations, r.num_operands), "rl.task"
    elif split == "eval" and r.eval_paths:
        return read_jsonl(r.eval_paths, "rl.eval_paths")
    else:
        examples, key = read_jsonl(r.paths, "rl.paths"), "rl.paths"
    if split == "eval":
        return holdout(examples, "eval", config.data.eval_fraction, key)
    rest = holdout(examples, "train", config.data.eval_fraction, key)
    if split == "sft" and not r.sft_fraction:
        raise ConfigError("config key rl.sft_fraction: is 0, so the task sets no problems "
                          "aside for a supervised stage that reads it (paths='task')")
    if not r.sft_fraction:
        return rest
    # The sft share is the "eval" share of a second fixed holdout over the rest.
    return holdout(rest, "eval" if split == "sft" else "train", r.sft_fraction, "rl.sft_fraction")


def task_conversations(config: ml_collections.ConfigDict, split: str) -> list[list[dict]]:
    """The task as SFT conversations: train -> the task's `sft` split, eval -> its `eval`."""
    return [[{"role": "user", "content": e["prompt"]},
             {"role": "assistant", "content": e["answer"]}]
            for e in split_examples(config, "sft" if split == "train" else "eval")]


OFFSETS = (-3, -2, -1, 1, 2, 3)
# Kinds of wrong answers a task's preference pairs can reject (rl.pair_negatives), and how many
# of each a training problem gets.
NEGATIVES = {"near": len(OFFSETS), "other": 3, "empty": 1, "trailing": 2}
# What a trailing answer continues with after the right one.
_TRAILERS = ("+", "-", "=", " ")


def wrong_answers(answer: str) -> list[str]:
    """Answers near `answer` that are not it: the integer off by 1 to 3 either way (for a
    non-integer answer, the answer with a digit appended)."""
    try:
        value = int(answer)
    except ValueError:
        return [answer + str(d) for d in range(len(OFFSETS))]
    return [str(value + d) for d in OFFSETS]


def negatives(kind: str, answer: str, answers: list[str], rng: np.random.Generator
              ) -> list[str]:
    """The wrong answers of one kind for a problem answered `answer` (NEGATIVES[kind] of them):

        near      the integer off by 1 to 3 (`wrong_answers`): only arithmetic tells them apart
        other     answers of other problems of the split (`answers`), each different from the
                  answer: wrong answers as likely as right ones
        empty     the empty answer (the turn closed at once)
        trailing  the answer followed by more text ("5+3", "5=1"): not an integer
    """
    if kind == "near":
        return wrong_answers(answer)
    if kind == "empty":
        return [""]
    if kind == "trailing":
        return [answer + _TRAILERS[rng.integers(len(_TRAILERS))] + str(rng.integers(10))
                for _ in range(NEGATIVES[kind])]
    pool = sorted(set(answers) - {answer})
    picks = rng.choice(len(pool), size=min(NEGATIVES[kind], len(pool)), replace=False)
    return [pool[i] for i in sorted(picks)]


def task_pairs(config: ml_collections.ConfigDict, split: str) -> list[Pair]:
    """The task as preference pairs, chosen the answer and rejected a wrong one:
    train -> every problem of the `sft` split with each wrong answer of the kinds in
    rl.pair_negatives (`negatives`; "near" alone: 6 pairs a problem), eval -> one pair per
    `eval` problem, its wrong answer a "near" one drawn from a fixed seed (whatever the kinds
    trained on: the hardest kind, so held-out accuracies of reward models compare)."""
    examples = split_examples(config, "sft" if split == "train" else "eval")
    kinds = split_list(config.rl.pair_negatives) if split == "train" else ["near"]
    answers = [e["answer"] for e in examples]
    rng = np.random.default_rng(_PAIR_SEED)
    pairs = []
    for e in examples:
        prompt = [{"role": "user", "content": e["prompt"]}]
        wrong = [w for kind in kinds for w in negatives(kind, e["answer"], answers, rng)]
        for rejected in (wrong if split == "train" else [wrong[rng.integers(len(wrong))]]):
            pairs.append(Pair(prompt=prompt, chosen=e["answer"], rejected=rejected))
    return pairs
