"""Rewards computed on the host from text: `(prompt, completion, example) -> float`.

`completion` is the decoded answer without its stop token; `example` the task record
({"prompt", "answer"}). `rl.rewards` names them with weights ("correct:1.0,format:0.1") and the
reward of a completion is the weighted sum. A new reward is one function here and one line in
`REWARDS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[str, str, dict], float]
_INTEGER = re.compile(r"-?\d+")


def _as_number(text: str) -> int | None:
    text = text.strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def correct(prompt: str, completion: str, example: dict) -> float:
    """1 when the completion is the reference answer (integers compared by value), else 0."""
    del prompt
    answer = example["answer"].strip()
    got, want = _as_number(completion), _as_number(answer)
    if want is not None:
        return float(got is not None and got == want)
    return float(completion.strip() == answer)


def format_integer(prompt: str, completion: str, example: dict) -> float:
    """1 when the completion is one integer and nothing else (a well-formed answer)."""
    del prompt, example
    return float(_as_number(completion) is not None)


def brevity(prompt: str, completion: str, example: dict) -> float:
    """-len(completion) / 100 characters: a weak push towards short answers."""
    del prompt, example
    return -len(completion) / 100.0


REWARDS: dict[str, RewardFn] = {"correct": correct, "format": format_integer,
                                "brevity": brevity}


def total_reward(weights: Sequence[tuple[str, float]], prompt: str, completion: str,
                 example: dict) -> tuple[float, dict[str, float]]:
    """The weighted sum of the named rewards, and each reward's own value."""
    parts = {name: float(REWARDS[name](prompt, completion, example)) for name, _ in weights}
    return sum(w * parts[name] for name, w in weights), parts
