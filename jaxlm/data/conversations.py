"""Conversations and preference pairs read from jsonl files or the embedded chatterbot corpus.

Conversations (SFT): one jsonl record per conversation, `{"messages": [{role, content}, ...]}`.

Preference pairs (DPO, reward model): one record `{prompt, chosen, rejected}` per pair, where
each is a string or a message list. Accepted layouts, all normalised to
`Pair(prompt=[messages], chosen=str, rejected=str)`:

* strings: prompt is one user message, chosen/rejected the assistant answers;
* UltraFeedback: prompt a string, chosen/rejected message lists that repeat the prompt and end
  with the assistant answer;
* HH-RLHF (messages): no prompt; chosen/rejected are whole conversations that share every turn
  but the last assistant answer;
* HH-RLHF (raw text): no prompt; chosen/rejected strings written "\\n\\nHuman: ...\\n\\nAssistant:
  ...".

`task` instead of file globs reads the problems of the run's `rl.*` task (jaxlm/data/tasks.py).
`chatterbot` instead of file globs reads the English dialogs of the `chatterbot-corpus` package
(installed with `pip install jaxlm[chat]`; 2,026 short YAML dialogs, nothing is downloaded at
run time). Its preference pairs are a demonstration set: chosen = the corpus answer, rejected =
an answer of another dialog drawn with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import ml_collections
import numpy as np

from jaxlm.data.chat import Message, check_messages
from jaxlm.run.errors import ConfigError

CHATTERBOT = "chatterbot"
# Fixed seed of the holdout permutation: changing data.seed never moves eval examples.
HOLDOUT_SEED = 20_240_611

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prompt (messages ending with a user turn) and two assistant answers."""

    prompt: list[Message]
    chosen: str
    rejected: str


def chatterbot_dir(language: str = "english") -> str:
    try:
        import chatterbot_corpus
    except ImportError:
        raise ValueError("the chatterbot corpus needs the chatterbot-corpus package: "
                         "pip install 'jaxlm[chat]' (or pip install chatterbot-corpus pyyaml)"
                         ) from None
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", language)


def chatterbot_conversations(language: str = "english") -> list[list[Message]]:
    """The corpus dialogs (files in name order) as user/assistant turns; a dialog that ends
    on a user turn loses that turn."""
    import yaml

    out = []
    for path in sorted(glob.glob(os.path.join(chatterbot_dir(language), "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for dialog in doc.get("conversations", []):
            turns = [str(t).strip() for t in dialog]
            turns = turns[:len(turns) - len(turns) % 2]
            if turns:
                out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                            for i, t in enumerate(turns)])
    return out


def chatterbot_pairs(seed: int = 0, language: str = "english") -> list[Pair]:
    """Demonstration preference pairs: for each assistant turn of each dialog, chosen = the
    corpus answer, rejected = an answer from a different dialog (different text)."""
    dialogs = chatterbot_conversations(language)
    answers = [(i, m["content"]) for i, d in enumerate(dialogs) for m in d
               if m["role"] == "assistant"]
    rng = np.random.default_rng(seed)
    pairs = []
    for i, dialog in enumerate(dialogs):
        for j, m in enumerate(dialog):
            if m["role"] != "assistant":
                continue
            while True:
                k, other = answers[int(rng.integers(len(answers)))]
                if k != i and other != m["content"]:
                    break
            pairs.append(Pair(prompt=dialog[:j], chosen=m["content"], rejected=other))
    return pairs


def _jsonl_records(spec: str, key: str) -> list[tuple[str, Any]]:
    from jaxlm.data import sources
    from jaxlm.data.config import split_list

    records = []
    for path in sources.expand_globs(split_list(spec), key):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:{n}"
                    try:
                        records.append((where, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: not JSON ({e})") from None
    if not records:
        raise ConfigError(f"config key {key}: {spec!r} holds no records")
    return records


def read_conversations(spec: str, key: str) -> list[list[Message]]:
    """Conversations of `spec` ("chatterbot" or comma-separated jsonl globs)."""
    if spec == CHATTERBOT:
        return chatterbot_conversations()
    out = []
    for where, record in _jsonl_records(spec, key):
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError(f"{where}: a conversation record needs a 'messages' list")
        out.append(check_messages(record["messages"], where))
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _parse_hh_text(text: str, where: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "user" if speaker == "Human" else "assistant",
                 "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if not messages:
        raise ValueError(f"{where}: text without '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    return messages


def _as_messages(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        if _HH_TURN.search(value):
            return _parse_hh_text(value, where)
        return [{"role": "user", "content": value}]
    return check_messages(value, where)


def _answer(value: Any, prompt: list[Message] | None, where: str) -> tuple[list[Message], str]:
    """(the messages before the answer, the answer) of a chosen/rejected field."""
    if isinstance(value, str) and not _HH_TURN.search(value):
        if prompt is None:
            raise ValueError(f"{where}: a string answer needs a 'prompt' field")
        return prompt, value
    messages = _as_messages(value, where)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: chosen/rejected must end with an assistant message")
    before = messages[:-1]
    if prompt is not None and before and before != prompt:
        raise ValueError(f"{where}: chosen/rejected repeat turns that differ from 'prompt'")
    return (prompt if prompt is not None else before), messages[-1]["content"]


def parse_pair(record: Any, where: str) -> Pair:
    """A Pair from one record in any of the accepted layouts (module docstring)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected'")
    prompt = _as_messages(record["prompt"], where) if record.get("prompt") else None
    prompt_c, chosen = _answer(record["chosen"], prompt, f"{where} (chosen)")
    prompt_r, rejected = _answer(record["rejected"], prompt, f"{where} (rejected)")
    if prompt_c != prompt_r:
        raise ValueError(f"{where}: chosen and rejected continue different conversations")
    if not prompt_c or prompt_c[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user message")
    return Pair(prompt=prompt_c, chosen=chosen, rejected=rejected)


def read_pairs(spec: str, key: str, seed: int = 0) -> list[Pair]:
    """Preference pairs of `spec` ("chatterbot" or comma-separated jsonl globs)."""
    if spec == CHATTERBOT:
        return chatterbot_pairs(seed)
    return [parse_pair(record, where) for where, record in _jsonl_records(spec, key)]


def holdout(items: list[Any], split: str, eval_fraction: float, key: str) -> list[Any]:
    """`split`'s share of `items` under a fixed permutation (eval gets ceil(fraction * n))."""
    n = len(items)
    num_eval = int(np.ceil(eval_fraction * n))
    if split == "eval" and num_eval == 0:
        raise ConfigError(f"config key data.eval_fraction: is 0, so {key} has no eval examples; "
                         "set it > 0 or set the stage's eval_paths")
    if split == "train" and num_eval >= n:
        raise ConfigError(f"config key data.eval_fraction: leaves none of the {n} examples of "
                         f"{key} for training")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    chosen = order[:num_eval] if split == "eval" else order[num_eval:]
    return [items[i] for i in sorted(chosen)]


def read_split(read: Callable[[str, str], list[T]], config: ml_collections.ConfigDict,
               section: str, split: str) -> list[T]:
    """The records of `split` for a stage's section ("sft", "dpo", "reward"), read by
    `read(spec, key)`: <section>.eval_paths for "eval" when set, otherwise the split's share
    of <section>.paths under the fixed holdout (data.eval_fraction). <section>.paths = "task":
    the rl.* task's problems as conversations (sft) or preference pairs (dpo, reward), its
    splits (jaxlm/data/tasks.py)."""
    paths, eval_paths = config[section].paths, config[section].eval_paths
    if split == "eval" and eval_paths:
        return read(eval_paths, f"{section}.eval_paths")
    if paths == "task":
        from jaxlm.data import tasks  # tasks reads this module's holdout

        make = tasks.task_conversations if section == "sft" else tasks.task_pairs
        return make(config, split)
    return holdout(read(paths, f"{section}.paths"), split, config.data.eval_fraction,
                   f"{section}.paths")
