"""Prompts with checked answers: the procedural arithmetic task and jsonl files.

An example is `{"prompt": str, "answer": str}`. The arithmetic task enumerates every
`a <op> b` with operands in [0, rl.max_operand] ("3+4=" -> "7"); like the jsonl task, its
held-out share is data.eval_fraction of the examples under a fixed permutation, so the train and
eval prompts never overlap and do not depend on any seed.
"""

from __future__ import annotations

import json
import operator

import ml_collections

from jaxlm.data.config import split_list
from jaxlm.data.conversations import holdout
from jaxlm.data.sources import expand_globs
from jaxlm.run.errors import ConfigError

Example = dict[str, str]
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_examples(max_operand: int, operations: str) -> list[Example]:
    """Every `a op b` with 0 <= a, b <= max_operand, in a fixed order."""
    return [{"prompt": f"{a}{op}{b}=", "answer": str(_OPS[op](a, b))}
            for op in operations for a in range(max_operand + 1)
            for b in range(max_operand + 1)]


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
    """The examples of `split` ("train" or "eval") of config.rl's task."""
    r = config.rl
    if r.task == "arithmetic":
        examples = arithmetic_examples(r.max_operand, r.operations)
        return holdout(examples, split, config.data.eval_fraction, "rl.task")
    if split == "eval" and r.eval_paths:
        return read_jsonl(r.eval_paths, "rl.eval_paths")
    return holdout(read_jsonl(r.paths, "rl.paths"), split, config.data.eval_fraction, "rl.paths")
